"""The on-device assistant: profile, prompts, retrieval, reranking, feedback, gate, drift, experts.

Tiny random model (its text is gibberish, its gradients are real) and the real 384-d
all-MiniLM-L6-v2 embedder.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.assistant.adapt import hot_swap
from client.assistant.assistant import Assistant
from client.assistant.engine import build_messages, rerank, retrieve, system_prompt
from client.assistant.evidence import DriftDetector, Gate
from client.assistant.experts import Expert, ExpertRouter
from client.assistant.profile import Profile, detect_format, extract_context, time_of_day
from client.store import Interaction
from client.store.state import init_device
from common.embedding import EMBED_DIM, get_embedder, user_embedding
from tests.conftest import open_test_store

BULLETS = "- Sail at dawn\n- Trim the sails\n- Watch the wind"
PROSE = (
    "Sailing is an old and wonderful craft that rewards patience, and there is a great deal one "
    "could say about the wind, the water and the boat before even leaving the harbour."
)


@pytest.fixture
def assistant(tmp_path):
    store = open_test_store(tmp_path / "dev")
    init_device(store, model="tiny")
    a = Assistant(store, feedback_lr=0.5)
    yield a
    store.close()


def test_embeddings_are_unit_384_d_and_semantic() -> None:
    emb = get_embedder()
    vecs = emb.encode(["How do I bake bread?", "A recipe for sourdough loaf", "Fix my segfault"])
    assert vecs.shape == (3, EMBED_DIM)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.2


def test_recent_texts_come_from_the_embedders_cache_with_the_same_vectors(monkeypatch) -> None:
    # Prepare: a fresh embedder with room for 2 texts, counting the texts it runs the model on.
    from common.embedding import Embedder

    emb = Embedder(cache_size=2)
    embedded: list[str] = []
    run = emb._embed
    monkeypatch.setattr(emb, "_embed", lambda t, b: embedded.extend(t) or run(t, b))
    fresh = emb.encode(["bread", "sails", "bread"])  # a duplicate is embedded once

    # Execute: both again (cached), then a third text (evicts the oldest), then the oldest.
    again = emb.encode(["sails", "bread"])
    emb.encode(["wind"])
    emb.encode(["sails"])

    # Assert: the same vectors, and the model ran only on texts not held.
    assert embedded == ["bread", "sails", "wind", "sails"]
    np.testing.assert_array_equal(again, fresh[[1, 0]])
    np.testing.assert_array_equal(fresh[0], fresh[2])
    assert emb.encode([]).shape == (0, EMBED_DIM)
    emb.clear_cache()
    assert emb.cached() == 0


def test_user_embedding_weights_recent_history_more() -> None:
    a, b = np.eye(EMBED_DIM, dtype=np.float32)[:2]
    now = 1_000_000.0
    u = user_embedding([(a, now - 30 * 86400), (b, now)], now=now, half_life_days=7)
    assert u @ b > 0.9 > u @ a
    assert np.linalg.norm(u) == pytest.approx(1.0, abs=1e-5)


def test_profile_validates_and_names_the_bad_key() -> None:
    with pytest.raises(ValueError, match="profile.tone"):
        Profile().updated({"tone": "angry"})
    with pytest.raises(ValueError, match="unknown profile key"):
        Profile.from_dict({"colour": "blue"})
    with pytest.raises(ValueError, match="learned on the device"):
        Profile().updated({"implicit": {}})
    p = Profile().updated({"domains": "sailing, mail me at a@b.example.com"})
    assert p.domains == ["sailing", "mail me at [EMAIL]"]


def test_implicit_preferences_follow_behaviour() -> None:
    p = Profile(length="short")
    emb = get_embedder().encode_one(BULLETS)
    for _ in range(4):
        p.observe(response=BULLETS * 4, embedding=emb, rating=5)
    assert p.implicit.kept_words == pytest.approx(len((BULLETS * 4).split()), rel=0.3)
    assert p.target_words() > 30  # pulled up from "short" toward what the user keeps
    assert p.preferred_format() == "bullets"
    assert p.implicit.mean_rating == pytest.approx(5.0)
    assert p.vectors()[0] is not None and p.vectors()[1] is None


def test_format_and_context_detection() -> None:
    assert detect_format(BULLETS) == "bullets"
    assert detect_format("1. a\n2. b") == "steps"
    assert detect_format("```py\nx=1\n```") == "code"
    assert detect_format(PROSE) == "prose"
    assert [time_of_day(h) for h in (6, 13, 19, 2)] == ["morning", "afternoon", "evening", "night"]
    ctx = extract_context(task="Email to bob@example.com")
    assert ctx["task"] == "Email to [EMAIL]" and set(ctx) >= {"time_of_day", "weekday", "device"}


def test_prompt_follows_the_profile_and_uses_the_chat_template(assistant) -> None:
    plain = system_prompt(Profile())
    poetic = system_prompt(Profile(tone="poetic", format="bullets", assistant="tutor"))
    assert "thee and thou" in poetic and "bulleted" in poetic and "tutor" in poetic
    assert "thee" not in plain
    messages = build_messages(Profile(tone="poetic"), "Hello", context=extract_context())
    text = assistant.rt.tokenizer.apply_chat_template(messages, tokenize=False)
    assert "<|im_start|>system" in text and "thee and thou" in text and "Context: it is" in text


def test_retrieval_finds_the_relevant_past_interaction() -> None:
    emb = get_embedder()
    past = [
        Interaction(1, 0.0, "How do I bake sourdough bread?", "Feed the starter.", {}, None),
        Interaction(2, 0.0, "My python script raises KeyError", "Check the dict.", {}, None),
    ]
    for i in past:
        i.embedding = emb.encode_one(i.prompt)
    hits = retrieve(emb.encode_one("a good bread recipe"), past)
    assert [h.interaction.id for h in hits] == [1]
    prompt = system_prompt(Profile(), history=hits)
    assert prompt.count("they asked") == 1 and "Feed the starter" not in prompt
    hits[0].endorsed = "Feed the starter."
    assert "an answer they liked: Feed the starter." in system_prompt(Profile(), history=hits)


def test_rerank_drops_candidates_that_leak_someone_elses_pii() -> None:
    emb = get_embedder()
    texts = ["Write to jane.doe@example.com for help.", "Ask at the front desk."]
    ranked = rerank(texts, emb.encode(texts), query=None, profile=Profile())
    assert [s.text for s in ranked] == ["Ask at the front desk."]
    assert ranked[0].index == 1
    only_pii = rerank(texts[:1], emb.encode(texts[:1]), query=None, profile=Profile())
    assert only_pii[0].text == "Write to an email address for help."
    # The user's own address, given in the conversation, is no leak: it stays as written.
    own = rerank(
        texts, emb.encode(texts), query=None, profile=Profile(), known="I am jane.doe@example.com"
    )
    assert {s.text for s in own} == set(texts)


def test_feedback_changes_the_next_ranking_and_the_personal_parameters(assistant) -> None:
    # Prepare: an answer in long prose (fixed text, not the random model's sample: what the
    # user turns down decides the ranking), and two fixed candidates to rank before and after.
    question = "How should I start sailing?"
    answered = assistant.store.add_interaction(
        question, PROSE, embedding=assistant.embedder.encode_one(question)
    )
    candidates = [PROSE, "- Sail early\n- Check the wind\n- Trim the sails"]
    vecs = assistant.embedder.encode(candidates)
    before_rank = [s.text for s in rerank(candidates, vecs, query=None, profile=assistant.profile)]
    before = {n: t.clone() for n, t in assistant.personal_tensors().items()}

    # Execute: the user prefers a bulleted answer, several times.
    results = [assistant.feedback(answered, preferred=BULLETS) for _ in range(4)]

    # Assert: the bulleted candidate now wins, and only personal tensors moved (blend, the
    # default: the personal adapter, never the federation's).
    after_rank = [s.text for s in rerank(candidates, vecs, query=None, profile=assistant.profile)]
    assert before_rank[0] == PROSE and after_rank[0] == candidates[1]
    assert all(r.adapted and r.adapt_ms > 0 for r in results)
    after = assistant.personal_tensors()
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and moved <= set(assistant.rt.personal_names)
    assert not moved & set(assistant.rt.shared_names)
    # Persisted: a reopened assistant sees the same personal tensors.
    stored = assistant.state.load_personal()
    assert all(torch.equal(stored[n], after[n]) for n in stored)


def test_low_rating_teaches_dislikes_without_training(assistant) -> None:
    answer = assistant.ask("Tell me a joke", n=1, max_new_tokens=8, seed=1)
    before = assistant.personal_tensors()
    result = assistant.feedback(answer.interaction_id, rating=1)
    assert not result.adapted
    assert assistant.profile.implicit.n_disliked == 1
    after = assistant.personal_tensors()
    assert all(torch.equal(before[n], after[n]) for n in before)
    with pytest.raises(ValueError, match="no interaction"):
        assistant.feedback(999, rating=5)
    with pytest.raises(ValueError, match="rating must be"):
        assistant.feedback(answer.interaction_id, rating=9)


def test_cold_start_gate_switches_to_personal_on_evidence(assistant) -> None:
    # Prepare
    answer = assistant.ask("Speak to me of the sea", n=1, max_new_tokens=8, seed=2)
    assert assistant.variant == "global"

    # Execute: repeated preference for one answer; each is scored before training on it.
    for _ in range(3):
        assistant.feedback(answer.interaction_id, preferred="The sea is calm tonight.")

    # Assert
    p, g = np.mean(assistant.gate.prequential, axis=0)
    assert p < g
    assert assistant.variant == "personal"
    assert "on-device evidence" in assistant.gate.reason()
    # The decision survives a restart.
    again = Assistant(assistant.store)
    assert again.variant == "personal"


def test_gate_uses_federation_evidence_until_local_evidence_exists() -> None:
    gate = Gate()
    assert not gate.use_personal()
    gate.federated = (3.0, 3.5)
    assert gate.use_personal()
    for _ in range(3):
        gate.record(personal_loss=4.0, global_loss=3.0)
    assert not gate.use_personal()
    restored = Gate()
    restored.load_state_dict(gate.state_dict())
    assert restored.prequential == gate.prequential
    with pytest.raises(ValueError):
        restored.load_state_dict({"bad": 1})


def test_drift_detector_flags_a_shift_and_favours_recent_data() -> None:
    steady = DriftDetector(window=3)
    assert not any(steady.update(x) for x in [2.0, 2.1, 1.9, 2.0, 2.05, 1.95, 2.0])
    shifted = DriftDetector(window=3)
    flags = [shifted.update(x) for x in [2.0, 2.0, 2.0, 2.0, 3.5, 3.6, 3.4]]
    assert any(flags[4:]) and not any(flags[:4])  # flagged once the shift shows
    assert len(shifted.events) == 1
    w = shifted.replay_weights(6)
    assert w == sorted(w) and w[-1] == 1.0


def test_router_gates_by_user_embedding_and_mixes_b_exactly() -> None:
    # Prepare: two experts whose centroids are orthogonal directions.
    e1, e2 = np.eye(EMBED_DIM, dtype=np.float32)[:2]
    name = "m.layers.0.q_proj.lora_B.default.weight"
    b1, b2 = torch.ones(4, 2), -torch.ones(4, 2)
    router = ExpertRouter(
        [Expert("one", e1, {name: b1}), Expert("two", e2, {name: b2})], temperature=0.1
    )

    # Execute
    user = (0.9 * e1 + 0.1 * e2) / np.linalg.norm(0.9 * e1 + 0.1 * e2)
    g = router.gates(user)
    mixed = router.mix(user)

    # Assert: expert one dominates; the mix is exactly Σ g_i B_i.
    assert g[0] > 0.99 and g.sum() == pytest.approx(1.0)
    torch.testing.assert_close(mixed[name], float(g[0]) * b1 + float(g[1]) * b2)
    with pytest.raises(ValueError, match="exact only for LoRA B"):
        ExpertRouter([Expert("a", e1, {"x.lora_A.default.weight": b1})])


def test_hot_swap_changes_outputs_without_reloading_the_base(assistant) -> None:
    model = assistant.rt.model
    ids = torch.tensor([[1, 2, 3, 4]])
    base_weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    before = model(input_ids=ids).logits
    tensors = {n: torch.randn_like(t) * 0.5 for n, t in assistant.personal_tensors().items()}
    ms = hot_swap(model, tensors)
    after = model(input_ids=ids).logits
    assert ms >= 0 and not torch.allclose(before, after)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight is base_weight
    assistant.activate()
    torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_ab_test_answers_come_from_both_arms_and_their_ratings_are_counted(
    tmp_path, monkeypatch
) -> None:
    # Prepare: an A/B-testing assistant; the user rates every answer. The device's coin is
    # the OS's randomness: here it alternates, so both arms are certain to answer.
    import itertools

    from client.federation.device import Device
    from common.config import parse_run_config
    from tests.conftest import tiny_run_config

    flips = itertools.cycle((0, 1))
    monkeypatch.setattr("secrets.choice", lambda seq: seq[next(flips)])
    store = open_test_store(tmp_path / "ab")
    init_device(store, model="tiny")
    a = Assistant(store, ab_test=True)
    variants = []
    for i in range(12):
        answer = a.ask(f"question number {i}", n=1, max_new_tokens=4, seed=i)
        variants.append(answer.variant)
        a.feedback(answer.interaction_id, rating=5 if answer.variant == "personal" else 2)

    # Execute: the device's next federated round counts them (no simulated user).
    cfg = parse_run_config(tiny_run_config(**{"ab.simulate-ratings": False}))
    device = Device.simulated(cfg, store=store, partition_id=0, num_partitions=4)
    g = {n: device.rt.init[n] for n in device.rt.shared_names}
    counts = device.ab_counts(g, None, server_round=1)
    again = device.ab_counts(g, None, server_round=2)
    store.close()

    # Assert
    assert set(variants) == {"global", "personal"}
    k = cfg.ab.interactions
    recent = variants[-k:]
    assert counts[0] == recent.count("global") and counts[3] == recent.count("personal")
    assert counts[1] == 2 * recent.count("global") and counts[4] == 5 * recent.count("personal")
    assert again.sum() == 0  # each rating is reported once


def _expert_adapter(assistant: Assistant, out, scale: float):  # type: ignore[no-untyped-def]
    """A peft adapter of ``assistant``'s model whose B tensors are ``scale`` everywhere."""
    from common.lora import export_adapter

    tensors = {n: torch.full_like(t, scale) for n, t in assistant.global_tensors().items()}
    return export_adapter(
        tensors, assistant.cfg.model, out, base_model="tiny", note={"kind": "expert"}
    )


def test_experts_are_installed_routed_and_answer_until_the_personal_model_has_evidence(
    tmp_path,
) -> None:
    # Prepare: fedsa (experts differ in B only, so mixing is exact).
    store = open_test_store(tmp_path / "dev")
    init_device(store, model="tiny", strategy="fedsa")
    assistant = Assistant(store)
    cooking = _expert_adapter(assistant, tmp_path / "cooking", 0.01)
    code = _expert_adapter(assistant, tmp_path / "code", -0.01)

    # Execute
    assistant.add_expert("cooking", cooking, about="recipes, baking and cooking dinner")
    gates = assistant.add_expert("code", code, about="python programming and debugging")

    # Assert: the router answers (cold start), gates sum to 1, the mix is Σ g_i B_i.
    assert assistant.variant == "experts" and set(gates) == {"cooking", "code"}
    assert sum(gates.values()) == pytest.approx(1.0)
    user = assistant.user_vector()
    mixed, g = assistant.router.mix(user), assistant.router.gates(user)
    for name, t in mixed.items():
        want = 0.01 * g[0] - 0.01 * g[1]
        assert torch.allclose(t, torch.full_like(t, want), rtol=1e-3), (
            name,
            want,
        )  # stored as fp16
    assert "expert adapters (cooking, code)" in assistant.why()
    # A user who talks about cooking moves the gate towards the cooking expert.
    for q in ("How long do I bake bread?", "A good dinner recipe with rice?"):
        assistant.store.add_interaction(q, "…", embedding=assistant.embedder.encode_one(q))
    after = dict(
        zip(
            [e.name for e in assistant.router.experts],
            assistant.router.gates(assistant.user_vector()),
            strict=True,
        )
    )
    assert after["cooking"] > gates["cooking"]
    # Restart: the experts come back from the store.
    assert Assistant(store).variant == "experts"
    # An adapter of another shape is refused, and nothing changes.
    other = tmp_path / "other"
    init_store = open_test_store(tmp_path / "dev2")
    init_device(init_store, model="tiny", strategy="fedsa", overrides={"model.lora-r": 8})
    wrong = _expert_adapter(Assistant(init_store), other, 0.5)
    with pytest.raises(ValueError, match="does not fit"):
        assistant.add_expert("wrong", wrong, about="anything")
    assert [e.name for e in assistant.router.experts] == ["cooking", "code"]
    init_store.close()
    store.close()


def test_the_cuda_graph_feedback_step_refuses_a_cpu_model(assistant) -> None:
    # (Its capture and replay run in tests/test_gpu_path.py on a CUDA machine.)
    from client.assistant.adapt import GraphedAdapter

    with pytest.raises(ValueError, match="CUDA"):
        GraphedAdapter(
            assistant.rt.model,
            assistant.rt.personal_names,
            seq_len=16,
            learning_rate=0.1,
            pad_id=assistant.pad_id,
        )
    assert assistant._graphed_adapter() is None  # on CPU the eager steps are used
