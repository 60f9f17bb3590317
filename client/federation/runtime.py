"""The model a process serves devices with: the base model wrapped with the strategy's LoRA
adapters, loaded once per process and shared by every device it serves (a Ray actor serves
many simulated devices; the assistant and the device worker one each). Each user's tensors are
loaded into it in place (:func:`common.lora.load_lora_tensors`), so nothing leaks between users.

The assistant asks for a *serving* runtime (``get_runtime(cfg, serving=precision)``): where
answers come from a bf16 copy (:func:`common.serving.serving_model`: a CPU with native bf16,
its next-token distributions checked against fp32's), its frozen base weights are then held in
bf16 too — feedback scores and trains without re-casting 4 bytes a weight on every pass, and
the process holds the same memory as one fp32 model (bf16 base + bf16 serving copy). LoRA
tensors stay fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from common.config import RunConfig
from common.lora import build_peft_model, init_lora_tensors, lora_shapes
from common.model import load_base_for, load_tokenizer, model_dir
from common.personalization import Strategy, strategy_for
from common.serving import ServingCopy, frozen_base_to, serving_model


@dataclass
class Runtime:
    """A loaded base model with the strategy's adapters, shared by devices in one process."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    strategy: Strategy
    init: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    shared_names: list[str]
    personal_names: list[str]
    trainable_names: list[str]
    base_ref: str
    served: ServingCopy | None = None
    # The assistant's llama.cpp path (client.assistant.llama_path.LlamaPath), made once per model.
    llama: Any = None


_RUNTIMES: dict[tuple, Runtime] = {}


def get_runtime(cfg: RunConfig, *, serving: str | None = None) -> Runtime:
    """Load (once per process) the base model and wrap it for ``cfg``'s strategy and LoRA.

    Args:
        cfg: The run config (model, LoRA, strategy).
        serving: For the assistant: its answer precision (``auto``, ``float32``,
            ``bfloat16``; see the module docstring); ``None`` for training and evaluation.
    """
    key = (cfg.model, cfg.strategy, cfg.personalization, serving)
    if key not in _RUNTIMES:
        strategy = strategy_for(cfg)
        for old in _RUNTIMES.values():  # llama.cpp's native memory goes with its runtime
            if old.llama is not None:
                old.llama.close()
        _RUNTIMES.clear()  # one model per process: a new config replaces the old one
        base = load_base_for(cfg.model)
        model = build_peft_model(base, cfg.model, strategy)
        shapes = lora_shapes(model)
        shared, personal, _ = strategy.split(list(shapes))
        tokenizer = load_tokenizer(cfg.model.name)
        served = None if serving is None else serving_model(model, tokenizer, serving)
        if served is not None:
            frozen_base_to(model, torch.bfloat16)
        _RUNTIMES[key] = Runtime(
            model=model,
            tokenizer=tokenizer,
            strategy=strategy,
            init=init_lora_tensors(shapes, seed=cfg.model.init_seed, strategy=strategy),
            shapes=shapes,
            shared_names=shared,
            personal_names=personal,
            trainable_names=[n for n in shapes if strategy.is_trainable(n)],
            base_ref=str(model_dir(cfg.model.name)),
            served=served,
        )
    return _RUNTIMES[key]


def shared_shapes(cfg: RunConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the shared tensors for ``cfg`` (what the server sends)."""
    rt = get_runtime(cfg)
    return {n: rt.shapes[n] for n in rt.shared_names}


def shared_dim(cfg: RunConfig) -> int:
    """How many numbers the shared update holds for ``cfg``, from the model's skeleton (on
    the ``meta`` device: no weights loaded, as the server derives it)."""
    import math

    from common.lora import build_skeleton
    from common.model import load_model_config

    strategy = strategy_for(cfg)
    shapes = lora_shapes(build_skeleton(load_model_config(cfg.model.name), cfg.model, strategy))
    shared, _, _ = strategy.split(list(shapes))
    return sum(math.prod(shapes[n]) for n in shared)
