"""LoRA adapters with peft: build, deterministic initialisation, tensor get/set, peft export.

Every party (server and devices) must start from the *same* LoRA initialisation without
exchanging it: :func:`init_lora_tensors` draws each tensor from a generator seeded by
``(model.init-seed, parameter name)``, independent of module order and of the device.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from common.atomic import atomic_write_dir, check_replaceable
from common.config import ModelConfig
from common.personalization import GLOBAL_ADAPTER, Strategy
from common.personalization.base import adapter_of, is_lora_a

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NOTE = "fedpersona.json"
ADAPTER_FILES = frozenset({ADAPTER_WEIGHTS, "adapter_config.json", ADAPTER_NOTE, "README.md"})


def is_fedpersona_adapter(path: Path) -> bool:
    """Whether ``path`` is a folder fedpersona wrote an adapter into, and nothing else."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink() or not (path / ADAPTER_NOTE).is_file():
        return False
    return all(p.name in ADAPTER_FILES and p.is_file() for p in path.iterdir())


def lora_config(cfg: ModelConfig, *, rank_multiplier: int = 1) -> LoraConfig:
    """peft ``LoraConfig`` for ``cfg`` (``rank_multiplier`` widens it for concatenation)."""
    layers = cfg.layer_range()
    return LoraConfig(
        r=cfg.lora_r * rank_multiplier,
        lora_alpha=cfg.lora_alpha * rank_multiplier,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        layers_to_transform=None if layers is None else list(range(layers[0], layers[1] + 1)),
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_peft_model(base: PreTrainedModel, cfg: ModelConfig, strategy: Strategy) -> PeftModel:
    """Wrap ``base`` with the strategy's LoRA adapter(s), all active, deterministically set.

    The LoRA tensors are fp32 on any base (fp32, bf16 or a 4-bit QLoRA base from
    :func:`common.model.load_base_model`), with the same names and shapes.

    Raises:
        ValueError: If ``model.lora-targets`` matches no module of the base model.
    """
    layers = cfg.layer_range()
    n_layers = getattr(base.config, "num_hidden_layers", None)
    if layers is not None and n_layers is not None and layers[1] >= n_layers:
        raise ValueError(
            f"model.lora-layers={cfg.lora_layers!r}: the base model has layers 0-{n_layers - 1}"
        )
    try:
        model = get_peft_model(base, lora_config(cfg), adapter_name=GLOBAL_ADAPTER)
    except ValueError as err:
        raise ValueError(
            f"model.lora-targets={','.join(cfg.lora_targets)!r} do not match the base model: {err}"
        ) from err
    for adapter in strategy.adapters[1:]:
        model.add_adapter(adapter, lora_config(cfg))
    model.base_model.set_adapter(list(strategy.adapters))
    _lora_in_fp32(model)
    init = init_lora_tensors(lora_shapes(model), seed=cfg.init_seed, strategy=strategy)
    load_lora_tensors(model, init)
    return model


@torch.no_grad()
def _lora_in_fp32(model: torch.nn.Module) -> None:
    """Hold every LoRA tensor in fp32, whatever the base's dtype (bf16, fp16 or 4-bit).

    peft already upcasts adapters by default (``autocast_adapter_dtype``); this makes the
    federation's invariant explicit: devices with different bases train and exchange the same
    fp32 tensors, and AdamW's updates do not round away in bf16.
    """
    for name, param in model.named_parameters():
        if (".lora_A." in name or ".lora_B." in name) and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)


def build_skeleton(config: PretrainedConfig, cfg: ModelConfig, strategy: Strategy) -> PeftModel:
    """The peft model on the ``meta`` device: names and shapes only, no memory, no weights."""
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
        model = get_peft_model(base, lora_config(cfg), adapter_name=GLOBAL_ADAPTER)
        for adapter in strategy.adapters[1:]:
            model.add_adapter(adapter, lora_config(cfg))
    return model


def lora_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every LoRA tensor of ``model``, in module order."""
    return {
        name: tuple(p.shape)
        for name, p in model.named_parameters()
        if ".lora_A." in name or ".lora_B." in name
    }


def init_lora_tensors(
    shapes: dict[str, tuple[int, ...]], *, seed: int, strategy: Strategy | None = None
) -> dict[str, torch.Tensor]:
    """Deterministic LoRA initialisation (peft's default distribution: A ~ kaiming-uniform
    with a=sqrt(5), i.e. U(±1/sqrt(fan_in)); B = 0), seeded per parameter name — or per the
    name ``strategy.init_name`` gives (``blend``'s adapters start alike)."""
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if is_lora_a(name):
            key = name if strategy is None else strategy.init_name(name)
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
            bound = 1.0 / math.sqrt(shape[1])
            out[name] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        else:
            out[name] = torch.zeros(shape)
    return out


def get_lora_tensors(
    model: torch.nn.Module, names: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Detached fp32 CPU copies of the named LoRA tensors (all LoRA tensors by default)."""
    params = dict(model.named_parameters())
    names = list(lora_shapes(model)) if names is None else names
    return {n: params[n].detach().to("cpu", torch.float32).clone() for n in names}


@torch.no_grad()
def load_lora_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the model's LoRA parameters in place (no re-wrapping).

    Validates every name, shape and value first, then copies all tensors at once (one
    finiteness check and one fused copy: on a GPU this is a hot-swap, not 120 syncs).

    Raises:
        ValueError: On an unknown name, a shape mismatch or a non-finite value; the model
            is left unchanged.
    """
    params = dict(model.named_parameters())
    targets, sources = [], []
    for name, value in tensors.items():
        if name not in params:
            raise ValueError(f"unknown LoRA tensor {name!r} for this model and strategy")
        target = params[name]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"shape mismatch for {name}: got {tuple(value.shape)}, "
                f"expected {tuple(target.shape)}"
            )
        targets.append(target)
        sources.append(value.to(target.device, target.dtype, non_blocking=True))
    if not sources:
        return
    if not bool(torch.stack([torch.isfinite(v).all() for v in sources]).all()):
        bad = next(n for n, v in zip(tensors, sources, strict=True) if not torch.isfinite(v).all())
        raise ValueError(f"non-finite values in LoRA tensor {bad}")
    torch._foreach_copy_(targets, sources)


def _peft_key(name: str, adapter: str) -> str:
    return name.replace(f".{adapter}.weight", ".weight")


def export_adapter(
    tensors: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: Path,
    *,
    base_model: str,
    adapters: tuple[str, ...] = (GLOBAL_ADAPTER,),
    note: dict | None = None,
    force: bool = False,
) -> Path:
    """Write LoRA tensors as a standard peft adapter (``PeftModel.from_pretrained`` loads it).

    With two adapters (``dual``), the sum B_g A_g + B_p A_p is written exactly as one adapter
    of rank 2r and alpha 2·alpha: [B_g | B_p] [A_g ; A_p], with the same alpha/r scaling.

    Args:
        tensors: Every LoRA tensor of ``adapters``, keyed by peft parameter name.
        cfg: LoRA settings used to train them.
        out_dir: Target directory (replaced atomically if it holds an earlier fedpersona
            adapter, or anything at all with ``force``).
        base_model: Value for ``base_model_name_or_path`` (a local path or a name).
        adapters: Which adapters ``tensors`` holds, combined by summation.
        note: Extra JSON written as ``fedpersona.json`` (what the adapter is).
        force: Replace ``out_dir`` whatever it holds.

    Raises:
        FileExistsError: ``out_dir`` holds other files and ``force`` is false (nothing is
            written then).
        ValueError: No tensors for one of ``adapters``.
    """
    may_replace = (lambda _: True) if force else is_fedpersona_adapter
    check_replaceable(Path(out_dir), may_replace, what="a fedpersona adapter")
    per_adapter: list[dict[str, torch.Tensor]] = []
    for adapter in adapters:
        part = {
            _peft_key(n, adapter): t.to(torch.float32).contiguous()
            for n, t in tensors.items()
            if adapter_of(n) == adapter
        }
        if not part:
            raise ValueError(f"no tensors for adapter {adapter!r}")
        per_adapter.append(part)
    merged: dict[str, torch.Tensor] = {}
    for key in per_adapter[0]:
        dim = 0 if ".lora_A." in key else 1
        merged[key] = torch.cat([p[key] for p in per_adapter], dim=dim).contiguous()
    config = lora_config(cfg, rank_multiplier=len(adapters))
    config.base_model_name_or_path = base_model

    def _write(tmp: Path) -> None:
        save_file(merged, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        (tmp / ADAPTER_NOTE).write_text(json.dumps(note or {}, indent=2, sort_keys=True))

    atomic_write_dir(Path(out_dir), _write, may_replace=may_replace)
    return Path(out_dir)


__all__ = [
    "build_peft_model",
    "build_skeleton",
    "export_adapter",
    "get_lora_tensors",
    "init_lora_tensors",
    "is_fedpersona_adapter",
    "load_lora_tensors",
    "lora_config",
    "lora_shapes",
]
