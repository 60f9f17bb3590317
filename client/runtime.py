"""The model a process serves devices with: the base model wrapped with the strategy's LoRA
adapters, loaded once per process and shared by every device it serves (a Ray actor serves
many simulated devices; the assistant and the device worker one each). Each user's tensors are
loaded into it in place (:func:`common.lora.load_lora_tensors`), so nothing leaks between users.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from common.config import RunConfig
from common.lora import build_peft_model, init_lora_tensors, lora_shapes
from common.model import load_base_for, load_tokenizer, model_dir
from common.personalization import Strategy, strategy_for


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


_RUNTIMES: dict[tuple, Runtime] = {}


def get_runtime(cfg: RunConfig) -> Runtime:
    """Load (once per process) the base model and wrap it for ``cfg``'s strategy and LoRA."""
    key = (cfg.model, cfg.strategy, cfg.personalization)
    if key not in _RUNTIMES:
        strategy = strategy_for(cfg)
        _RUNTIMES.clear()  # one model per process: a new config replaces the old one
        base = load_base_for(cfg.model)
        model = build_peft_model(base, cfg.model, strategy)
        shapes = lora_shapes(model)
        shared, personal, _ = strategy.split(list(shapes))
        _RUNTIMES[key] = Runtime(
            model=model,
            tokenizer=load_tokenizer(cfg.model.name),
            strategy=strategy,
            init=init_lora_tensors(shapes, seed=cfg.model.init_seed, strategy=strategy),
            shapes=shapes,
            shared_names=shared,
            personal_names=personal,
            trainable_names=[n for n in shapes if strategy.is_trainable(n)],
            base_ref=str(model_dir(cfg.model.name)),
        )
    return _RUNTIMES[key]


def shared_shapes(cfg: RunConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the shared tensors for ``cfg`` (what the server sends)."""
    rt = get_runtime(cfg)
    return {n: rt.shapes[n] for n in rt.shared_names}
