"""A bf16 serving copy of a LoRA model for answering on a CPU with native bf16.

Decoding one token reads every weight of the model once, so on a CPU it is bound by memory
bandwidth (this project's 2-core machine copies ~4.8 GB/s): SmolLM2's 540 MB of fp32 weights
cost ~85 ms per token, its 270 MB in bf16 ~60 ms — and with three candidates in one batch
the fp32 path also stops being a matrix-vector product (measured: 170 → 72 ms per step).

:class:`ServingCopy` keeps a plain bf16 copy of the base model (no peft layers) and, before
each generation, writes the LoRA model's *current* adapters into it: for every LoRA-wrapped
linear layer, ``W + Σ_adapters ΔW`` (peft's ``get_delta_weight``) computed in fp32 from the
untouched fp32 base, then rounded once to bf16. So whatever is loaded — personal, global, an
expert mix, a fresh feedback step — is what answers; nothing can go stale. The fp32 model
stays the one that trains and evaluates.

:func:`serving_model` decides: only on a CPU, only for an fp32 base, only with native bf16
(:func:`common.cpu.cpu_has_native_bf16`) unless asked for, and only if the copy's next-token
distributions agree with fp32's (:data:`PARITY_KL` on a fixed text) — else the fp32 model
answers and the reason is logged.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from common.cpu import cpu_has_native_bf16

log = logging.getLogger(__name__)

SERVING_PRECISIONS = ("auto", "float32", "bfloat16")

# The bf16 copy is used only if the mean KL(fp32 ‖ bf16) of its next-token distributions over
# a fixed text is below this (nats per token). Measured on SmolLM2: 0.002 — far below the
# sampling noise of temperature-0.8 answers; a broken conversion shows as ≫ 0.1.
PARITY_KL = 0.02
_CACHE_ATTR = "_fedpersona_serving_copies"
PARITY_TEXT = (
    "The assistant answers in a friendly, concise way. A user asked how to cook mushroom "
    "risotto for two people, and the assistant listed the ingredients and the steps."
)


class ServingCopy:
    """A bf16 copy of ``model``'s base that answers with ``model``'s current adapters.

    Args:
        model: The peft LoRA model (fp32 base, on the CPU); it is not modified.
    """

    def __init__(self, model: Any) -> None:
        self.source = model
        # A deep copy without the LoRA wrappers: the plain base model, in bf16.
        base = model.get_base_model()
        with _without_lora(model):
            self.model = copy.deepcopy(base).to(torch.bfloat16).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        modules = dict(self.model.named_modules())
        self._pairs: list[tuple[Any, torch.nn.Linear]] = []
        for name, module in base.named_modules():
            if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
                target = modules.get(name)
                if not isinstance(target, torch.nn.Linear):
                    raise TypeError(f"no plain linear layer {name!r} in the serving copy")
                self._pairs.append((module, target))
        self.refresh()

    @property
    def config(self) -> Any:
        """The model's config (what generation reads)."""
        return self.model.config

    @torch.no_grad()
    def refresh(self) -> torch.nn.Module:
        """Write the source's current adapters into the copy (fp32 sum, one bf16 rounding);
        return the copy, ready to generate."""
        for lora, target in self._pairs:
            weight = lora.base_layer.weight.to(torch.float32)
            for adapter in lora.active_adapters:
                if adapter in lora.lora_A and not lora.disable_adapters:
                    weight = weight + lora.get_delta_weight(adapter).to(torch.float32)
            target.weight.copy_(weight)
        return self.model


class _without_lora:
    """Context: ``model``'s LoRA layers temporarily replaced by their base layers, so a deep
    copy of the base holds plain ``nn.Linear`` modules (and no LoRA tensors)."""

    def __init__(self, model: Any) -> None:
        self.base = model.get_base_model()
        self.swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []

    def __enter__(self) -> None:
        for name, module in list(self.base.named_modules()):
            if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
                parent_name, _, attr = name.rpartition(".")
                parent = self.base.get_submodule(parent_name) if parent_name else self.base
                self.swapped.append((parent, attr, module))
                setattr(parent, attr, module.base_layer)

    def __exit__(self, *exc: object) -> None:
        for parent, attr, module in self.swapped:
            setattr(parent, attr, module)


@torch.no_grad()
def frozen_base_to(model: Any, dtype: torch.dtype) -> None:
    """Cast ``model``'s frozen base weights (everything but LoRA tensors) to ``dtype`` in
    place; the LoRA tensors stay as they are (fp32)."""
    for name, param in model.named_parameters():
        if ".lora_A." not in name and ".lora_B." not in name:
            param.data = param.data.to(dtype)


@torch.no_grad()
def reference_logprobs(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """``model``'s next-token log-probabilities (fp32) at every position of ``ids``, computed
    in eval mode (its training mode restored after)."""
    was_training = model.training
    model.eval()
    try:
        return model(input_ids=ids).logits.float().log_softmax(-1)
    finally:
        model.train(was_training)


def mean_kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Mean KL(ref ‖ got) over positions of next-token distributions given as log-probs."""
    return float((ref.exp() * (ref - got)).sum(-1).mean())


@torch.no_grad()
def parity_kl(model: Any, tokenizer: Any, copy_: ServingCopy) -> float:
    """Mean KL(fp32 ‖ bf16 copy) of next-token distributions over :data:`PARITY_TEXT`."""
    ids = tokenizer(PARITY_TEXT, return_tensors="pt")["input_ids"]
    ref = reference_logprobs(model, ids)
    return mean_kl(ref, copy_.refresh()(input_ids=ids).logits.float().log_softmax(-1))


def serving_model(model: Any, tokenizer: Any, precision: str = "auto") -> ServingCopy | None:
    """The bf16 serving copy of ``model``, or ``None`` where the model itself should answer.

    ``"float32"``: never. ``"bfloat16"``: whenever the model is an fp32 CPU model.
    ``"auto"``: where additionally the CPU has native bf16 and :func:`parity_kl` is below
    :data:`PARITY_KL`.

    Raises:
        ValueError: An unknown ``precision``.
    """
    if precision not in SERVING_PRECISIONS:
        raise ValueError(f"serving precision must be one of {SERVING_PRECISIONS}")
    param = next(model.parameters())
    if precision == "float32" or param.device.type != "cpu":
        return None
    base_dtype = model.get_base_model().get_input_embeddings().weight.dtype
    if base_dtype != torch.float32:
        return None
    if precision == "auto" and not cpu_has_native_bf16():
        return None
    cached = getattr(model, _CACHE_ATTR, {})
    if precision not in cached:  # once per model and process: the copy is 2 bytes a weight
        served: ServingCopy | None = ServingCopy(model)
        if precision == "auto":
            kl = parity_kl(model, tokenizer, served)
            if not kl < PARITY_KL:
                log.warning("bf16 answers differ from fp32's (KL %.4f): answering in fp32", kl)
                served = None
            else:
                log.info("answering with a bf16 copy (KL to fp32 %.5f nats/token)", kl)
        cached = {**cached, precision: served}
        setattr(model, _CACHE_ATTR, cached)
    return cached[precision]
