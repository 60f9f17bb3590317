"""The device's adapters, and a base model where none is shipped, as GGUF files for llama.cpp.

llama.cpp applies LoRA adapters at run time: a GGUF file of ``general.type = "adapter"``,
``adapter.type = "lora"``, holding for each adapted weight ``blk.{i}.{attn_q,…}.weight`` a pair
``….lora_a`` (rank × in) and ``….lora_b`` (out × rank), scaled by ``adapter_scale · alpha /
rank`` — or by ``adapter_scale`` alone when ``alpha`` is 0, which is what this module writes.

:func:`snapshot` reads what the peft model would answer with *now*: for every LoRA-wrapped
linear layer, its active adapters' A stacked (Σ ranks × in) and their B times each adapter's
peft scaling, side by side (out × Σ ranks) — so ``B·A`` is exactly ``Σ_adapters ΔW``, whatever
is loaded (personal, global, ``blend``'s weighted global, an expert mix, a feedback step).
:func:`write_adapter` writes it for one base GGUF:

* llama.cpp's converter permutes the rows of ``q_proj`` and ``k_proj`` (its rotary layout; the
  transformers GGUF loader un-permutes them), so the B of those layers is permuted alike;
* the adapter records the base it was made for (:attr:`BaseFacts.fingerprint`) and
  :func:`check_adapter` refuses one made for another base, which llama.cpp itself would load
  whenever the shapes happen to fit.

:func:`write_base` writes a transformers Llama (the tests' tiny model, a local model
directory) as an F32/F16 GGUF with the SmolLM2 GGUF's tokenizer; the embedded SmolLM2 answers
from its shipped Q4_1 GGUF as it is.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

# transformers' Llama module names -> llama.cpp's tensor names.
TENSOR_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
logging.getLogger("gguf").setLevel(logging.WARNING)  # not a line per adapter written
BASE_KEY = "fedpersona.base"  # the fingerprint of the base GGUF an adapter was made for
_LAYER = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")
# What a GGUF base must carry to be served, with the tokenizer copied by write_base.
_TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.chat_template",
)


class GGUFError(ValueError):
    """A GGUF file that cannot serve: unreadable, another architecture, another base."""


@dataclass(frozen=True)
class BaseFacts:
    """What an adapter must agree with: the base GGUF's architecture, heads and identity."""

    path: Path
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    n_ctx_train: int
    fingerprint: str  # sha256 of the file's size and its first and last MiB


@lru_cache(maxsize=8)
def _facts(path: str, size: int, mtime: int) -> BaseFacts:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        fields = {k: f.contents() for k, f in reader.fields.items() if k != "tokenizer.ggml.merges"}
        arch = str(fields["general.architecture"])
        facts = BaseFacts(
            path=Path(path),
            arch=arch,
            n_layer=int(fields[f"{arch}.block_count"]),
            n_head=int(fields[f"{arch}.attention.head_count"]),
            n_head_kv=int(
                fields.get(
                    f"{arch}.attention.head_count_kv", fields[f"{arch}.attention.head_count"]
                )
            ),
            n_vocab=len(fields["tokenizer.ggml.tokens"]),
            n_ctx_train=int(fields[f"{arch}.context_length"]),
            fingerprint=_fingerprint(Path(path), size),
        )
    except (KeyError, ValueError, IndexError, OSError) as err:
        raise GGUFError(f"{path} is not a readable GGUF model: {err}") from err
    if facts.arch != "llama":
        raise GGUFError(f"{path}: llama.cpp serving supports Llama models, this is {facts.arch!r}")
    return facts


def base_facts(path: Path) -> BaseFacts:
    """The facts of the base GGUF at ``path`` (read once per file version).

    Raises:
        GGUFError: The file is missing, not a GGUF model, or not a Llama.
    """
    try:
        st = os.stat(path)
    except OSError as err:
        raise GGUFError(f"no base GGUF at {path}: {err}") from err
    return _facts(str(path), st.st_size, st.st_mtime_ns)


def _fingerprint(path: Path, size: int) -> str:
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()


# ---- adapters -------------------------------------------------------------------------------

Snapshot = dict[str, tuple[torch.Tensor, torch.Tensor]]  # GGUF weight name -> (A, B·scaling)


@torch.no_grad()
def snapshot(model: Any) -> Snapshot:
    """The peft ``model``'s active LoRA adapters as one (A, B) pair per adapted weight, under
    llama.cpp's tensor names (fp32 CPU copies: the model may change right after).

    Raises:
        GGUFError: A LoRA-wrapped layer llama.cpp has no name for.
    """
    out: Snapshot = {}
    for name, module in model.named_modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "base_layer")):
            continue
        active = [a for a in module.active_adapters if a in module.lora_A]
        if module.disable_adapters or not active:
            continue
        match = _LAYER.search(name)
        if match is None or match.group(2) not in TENSOR_NAMES:
            raise GGUFError(f"llama.cpp has no tensor for the LoRA layer {name!r}")
        key = f"blk.{match.group(1)}.{TENSOR_NAMES[match.group(2)]}.weight"
        a = torch.cat([module.lora_A[x].weight.float() for x in active], dim=0)
        b = torch.cat([module.lora_B[x].weight.float() * module.scaling[x] for x in active], dim=1)
        out[key] = (a.detach().cpu(), b.detach().cpu())  # cat made them: copies already
    return out


def snapshot_id(snap: Snapshot) -> str:
    """A content hash of ``snap`` (same tensors, same id)."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(snap):
        a, b = snap[key]
        h.update(key.encode())
        h.update(a.numpy().tobytes())
        h.update(b.numpy().tobytes())
    return h.hexdigest()


def _permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's permutation of q/k output rows (its rotary layout)."""
    return (
        rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def write_adapter(path: Path, snap: Snapshot, base: BaseFacts) -> Path:
    """Write ``snap`` as a llama.cpp LoRA adapter for ``base`` at ``path``.

    Raises:
        GGUFError: ``snap`` names a layer the base does not have.
    """
    import gguf

    writer = gguf.GGUFWriter(None, arch=base.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 0.0)  # 0: the scale is the adapter's own (B holds it)
    writer.add_string(BASE_KEY, base.fingerprint)
    for key in sorted(snap):
        layer = int(key.split(".")[1])
        if layer >= base.n_layer:
            raise GGUFError(f"the adapter has layer {layer}; the base has {base.n_layer}")
        a, b = (t.numpy().astype(np.float32) for t in snap[key])
        if ".attn_q." in key:
            b = _permute(b, base.n_head)
        elif ".attn_k." in key:
            b = _permute(b, base.n_head_kv)
        stem = key.removesuffix(".weight")
        writer.add_tensor(f"{stem}.weight.lora_a", np.ascontiguousarray(a))
        writer.add_tensor(f"{stem}.weight.lora_b", np.ascontiguousarray(b))
    return _write(writer, path, atomic=False)


def _write(writer: Any, path: Path, *, atomic: bool = True) -> Path:
    """Write ``writer``'s file at ``path`` — through a temporary file renamed into place, or
    straight there (an in-memory file, where nothing else could read it half-written)."""
    target = path.with_name(f".{path.name}.{os.getpid()}.tmp") if atomic else path
    try:
        writer.write_header_to_file(path=target)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if atomic:
            os.replace(target, path)
    finally:
        if atomic:
            target.unlink(missing_ok=True)
    return path


def check_adapter(path: Path, base: BaseFacts) -> None:
    """Refuse an adapter file that is not a fedpersona LoRA adapter for ``base``.

    Raises:
        GGUFError: Unreadable, not a LoRA adapter, or made for another base.
    """
    import gguf

    try:
        fields = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}
    except (ValueError, OSError, IndexError) as err:
        raise GGUFError(f"{path} is not a readable GGUF adapter: {err}") from err
    if fields.get("general.type") != "adapter" or fields.get("adapter.type") != "lora":
        raise GGUFError(f"{path} is not a LoRA adapter")
    made_for = fields.get(BASE_KEY)
    if made_for != base.fingerprint:
        raise GGUFError(
            f"{path} was made for another base model ({made_for or 'unknown'}), "
            f"not {base.path.name} ({base.fingerprint[:12]})"
        )


# ---- a base model where none is shipped ------------------------------------------------------


@torch.no_grad()
def write_base(model: Any, path: Path, tokenizer_gguf: Path, *, f16: bool = False) -> Path:
    """Write a transformers Llama as a GGUF model (F32, or F16 for the large matrices) with
    the tokenizer of ``tokenizer_gguf`` (the SmolLM2 GGUF's: the tiny model shares it).

    Raises:
        GGUFError: Not a Llama, or a Llama with features this writer does not carry
            (rope scaling, biases).
    """
    import gguf

    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise GGUFError(f"llama.cpp serving supports Llama models, this is {cfg.model_type!r}")
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    if rope.get("rope_type", "default") != "default" or getattr(cfg, "attention_bias", False):
        raise GGUFError("this Llama uses rope scaling or biases, which the GGUF writer omits")
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(None, arch="llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name("fedpersona base")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // n_head)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    _copy_tokenizer(writer, tokenizer_gguf)
    for name, tensor in _llama_tensors(model, n_head, n_kv):
        big = tensor.ndim == 2 and f16
        writer.add_tensor(name, tensor.astype(np.float16 if big else np.float32))
    return _write(writer, path)


def _llama_tensors(model: Any, n_head: int, n_kv: int) -> list[tuple[str, np.ndarray]]:
    state = {k.removeprefix("model."): v.float().numpy() for k, v in model.state_dict().items()}
    out = [
        ("token_embd.weight", state["embed_tokens.weight"]),
        ("output_norm.weight", state["norm.weight"]),
    ]
    if not model.config.tie_word_embeddings:
        out.append(("output.weight", state["lm_head.weight"]))
    for i in range(model.config.num_hidden_layers):
        p = f"layers.{i}."
        out.append((f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"]))
        out.append((f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"]))
        for proj, gg in TENSOR_NAMES.items():
            part = "self_attn" if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            w = state[f"{p}{part}.{proj}.weight"]
            if proj == "q_proj":
                w = _permute(w, n_head)
            elif proj == "k_proj":
                w = _permute(w, n_kv)
            out.append((f"blk.{i}.{gg}.weight", w))
    return out


def _copy_tokenizer(writer: Any, source: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(source))
    for key in _TOKENIZER_KEYS:
        field = reader.fields.get(key)
        if field is None:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
