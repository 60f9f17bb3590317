"""K clients' LoRA steps batched through one base equal each client's solo round."""

from __future__ import annotations

import pytest
import torch

from common.config import ModelConfig
from common.data import Encoded
from common.lora import build_peft_model, get_lora_tensors, load_lora_tensors
from common.model import load_base_for
from common.multi_lora import ClientJob, lora_names, train_steps_batched
from common.personalization import get_strategy
from common.train import train_steps

PAD = 2


def _samples(seed: int, n: int = 6) -> list[Encoded]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 40, (1,), generator=gen))
        ids = torch.randint(10, 4000, (length,), generator=gen).tolist()
        cut = length // 2
        out.append(Encoded(tuple(ids), tuple([-100] * cut + ids[cut:])))
    return out


@pytest.fixture(scope="module")
def peft():  # type: ignore[no-untyped-def]
    cfg = ModelConfig(name="tiny")
    return build_peft_model(load_base_for(cfg), cfg, get_strategy("blend"))


def _jobs(peft) -> list[ClientJob]:  # type: ignore[no-untyped-def]
    names = lora_names(peft)
    shapes = {n: t.shape for n, t in get_lora_tensors(peft).items()}
    jobs = []
    for k in range(3):
        gen = torch.Generator().manual_seed(100 + k)
        tensors = {n: 0.05 * torch.randn(shapes[n], generator=gen) for n in names}
        jobs.append(ClientJob(tensors=tensors, samples=_samples(k), seed=7 + k))
    return jobs


def test_batched_clients_take_their_solo_rounds_steps(peft) -> None:
    # Prepare: 3 clients with their own tensors (global and personal adapters, both active
    # in blend), data and seeds; each trains its personal tensors only.
    jobs = _jobs(peft)
    trainable = [n for n in lora_names(peft) if ".personal." in n]
    assert trainable

    # Execute: one batched round, then each client alone through train_steps.
    batched, losses = train_steps_batched(
        peft, trainable, jobs, steps=3, batch_size=2, learning_rate=1e-2, precision="float32"
    )
    solo, solo_losses = [], []
    for job in jobs:
        load_lora_tensors(peft, job.tensors)
        solo_losses.append(
            train_steps(
                peft,
                trainable,
                job.samples,
                steps=3,
                batch_size=2,
                learning_rate=1e-2,
                seed=job.seed,
                pad_id=PAD,
                precision="float32",
            )
        )
        solo.append(get_lora_tensors(peft))

    # Assert: the same tensors and losses per client; the frozen tensors untouched; the
    # clients did move (differently).
    assert losses == pytest.approx(solo_losses, abs=1e-5)
    for k, job in enumerate(jobs):
        for name, value in solo[k].items():
            torch.testing.assert_close(batched[k][name], value, atol=1e-5, rtol=1e-4)
            if name not in trainable:
                assert torch.equal(batched[k][name], job.tensors[name])
        moved = sum(float((batched[k][n] - job.tensors[n]).abs().sum()) for n in trainable)
        assert moved > 0
    assert not torch.equal(batched[0][trainable[0]], batched[1][trainable[0]])


def test_batched_bf16_round_is_close_to_the_solo_bf16_round(peft) -> None:
    jobs = _jobs(peft)[:2]
    trainable = [n for n in lora_names(peft) if ".personal." in n]
    batched, _ = train_steps_batched(
        peft, trainable, jobs, steps=2, batch_size=2, learning_rate=1e-2, precision="bfloat16"
    )
    load_lora_tensors(peft, jobs[1].tensors)
    train_steps(
        peft,
        trainable,
        jobs[1].samples,
        steps=2,
        batch_size=2,
        learning_rate=1e-2,
        seed=jobs[1].seed,
        pad_id=PAD,
        precision="bfloat16",
    )
    solo = get_lora_tensors(peft, trainable)
    start = torch.cat([jobs[1].tensors[n].flatten() for n in trainable])
    d_solo = torch.cat([solo[n].flatten() for n in trainable]) - start
    d_batched = torch.cat([batched[1][n].flatten() for n in trainable]) - start
    assert float(torch.nn.functional.cosine_similarity(d_solo, d_batched, dim=0)) > 0.95


def test_a_client_without_samples_or_with_missing_tensors_is_refused(peft) -> None:
    jobs = _jobs(peft)
    trainable = [n for n in lora_names(peft) if ".personal." in n]
    empty = ClientJob(tensors=jobs[0].tensors, samples=[], seed=0)
    with pytest.raises(ValueError, match="client 1 has no training samples"):
        train_steps_batched(
            peft, trainable, [jobs[0], empty], steps=1, batch_size=1, learning_rate=1e-2
        )
    partial = ClientJob(
        tensors=dict(list(jobs[0].tensors.items())[1:]), samples=_samples(0), seed=0
    )
    with pytest.raises(ValueError, match="every LoRA tensor"):
        train_steps_batched(
            peft, trainable, [jobs[0], partial], steps=1, batch_size=1, learning_rate=1e-2
        )


def test_a_client_whose_loss_turns_non_finite_is_named(peft) -> None:
    jobs = _jobs(peft)
    trainable = [n for n in lora_names(peft) if ".personal." in n]
    jobs[2].tensors[trainable[0]] = torch.full_like(jobs[2].tensors[trainable[0]], 1e38)
    with pytest.raises(ValueError, match="client 2"):
        train_steps_batched(
            peft, trainable, jobs, steps=1, batch_size=2, learning_rate=1e-2, precision="float32"
        )


def test_the_batched_benchmark_times_both_paths_on_the_same_tokens() -> None:
    from benchmarks import batched as bench_batched

    r = bench_batched.bench("tiny", clients=2, steps=1)
    assert r["real_tokens"] > 0 and r["clients"] == 2
    assert r["ratio"] == pytest.approx(r["batched_tokens_per_s"] / r["solo_tokens_per_s"])
    assert r["min_update_cosine"] > 0.9
    assert "2 clients × 1 steps" in bench_batched.markdown(r)
