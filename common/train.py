"""Local training and held-out evaluation of a (peft) causal LM, independent of Flower.

Both the Message-API ClientApp and a legacy/SecAgg+ client call these; they take a model, the
names of the tensors to train and tokenized samples, and return plain numbers.

Whatever the base (fp32, bf16 or a 4-bit QLoRA base), the LoRA tensors are fp32 and every loss
is computed on fp32 logits. On CUDA the forward pass runs under ``torch.autocast`` in the base's
compute dtype (with a gradient scaler for fp16). On a CPU, training runs in ``train.precision``
(:func:`training_autocast`: bf16 autocast where the CPU has native bf16 and the loss agrees
with fp32's) and held-out losses in fp32, exactly plain PyTorch. Training batches and held-out
samples are packed into rows without padding (:func:`common.data.pack`).

(One file on purpose, over the usual length: plain steps, DP-SGD steps and held-out losses share
the batching, masking and autocast helpers at its top.)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import secrets
from collections.abc import Sequence
from typing import Any

import torch

from common.cpu import cpu_has_native_bf16
from common.data import IGNORE_INDEX, Encoded, collate, pack
from common.model import compute_dtype
from common.packed_attention import packed_rows

logger = logging.getLogger(__name__)


def autocast_for(model: torch.nn.Module) -> contextlib.AbstractContextManager[object]:
    """Mixed precision for one forward pass of ``model``.

    ``torch.autocast`` to the base's compute dtype when the model is on CUDA with a bf16, fp16
    or 4-bit base; a no-op otherwise. On a CPU a bf16 base needs no autocast: its matmuls are
    bf16 already and peft runs the fp32 LoRA path on an fp32 copy of the input.
    """
    dtype = compute_dtype(model)
    if next(model.parameters()).device.type != "cuda" or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


# bf16 training on a CPU is kept only if its loss on the first batch is within this relative
# distance of fp32's (bf16 keeps 8 bits of mantissa: a sound model agrees to ~1e-3).
BF16_PARITY_RTOL = 1e-2
_TRAIN_DTYPE_ATTR = "_fedpersona_cpu_train_dtype"


def _cpu_autocast(dtype: torch.dtype) -> contextlib.AbstractContextManager[object]:
    if dtype == torch.bfloat16:
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_autocast(
    model: torch.nn.Module, precision: str, batch: dict[str, torch.Tensor]
) -> contextlib.AbstractContextManager[object]:
    """The mixed precision of a training step (``train.precision``).

    On CUDA, or with a bf16/4-bit base, :func:`autocast_for` (the base's compute dtype). On a
    CPU with an fp32 base: ``"float32"`` — none; ``"bfloat16"`` — bf16 autocast (the LoRA
    tensors, optimizer state and the loss stay fp32); ``"auto"`` — bf16 where the CPU has
    native bf16 (:func:`cpu_has_native_bf16`) and ``batch``'s loss under bf16 is within
    ``BF16_PARITY_RTOL`` of fp32's, checked once per model (two forward passes, logged);
    else fp32.
    """
    on_cpu = next(model.parameters()).device.type == "cpu"
    if not on_cpu or compute_dtype(model) != torch.float32:
        return autocast_for(model)
    if precision == "float32":
        return contextlib.nullcontext()
    if precision == "bfloat16":
        return _cpu_autocast(torch.bfloat16)
    chosen = getattr(model, _TRAIN_DTYPE_ATTR, None)
    if chosen is None:
        chosen = torch.float32
        if cpu_has_native_bf16():
            exact, fast = bf16_parity(model, batch)
            if abs(fast - exact) <= BF16_PARITY_RTOL * abs(exact):
                chosen = torch.bfloat16
            else:
                logger.warning(
                    "bf16 training loss %.5f differs from fp32's %.5f: training in fp32",
                    fast,
                    exact,
                )
        logger.info("CPU training precision: %s", chosen)
        setattr(model, _TRAIN_DTYPE_ATTR, chosen)
    return _cpu_autocast(chosen)


def cpu_training_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """What ``train.precision = "auto"`` chose for ``model`` on a CPU (``None`` before its
    first training step)."""
    return getattr(model, _TRAIN_DTYPE_ATTR, None)


def forget_precision_choice(model: torch.nn.Module) -> None:
    """Let the next training step of ``model`` choose its CPU precision anew (a benchmark
    measuring the choice this CPU makes now, not one an earlier caller made)."""
    if hasattr(model, _TRAIN_DTYPE_ATTR):
        delattr(model, _TRAIN_DTYPE_ATTR)


@torch.no_grad()
def bf16_parity(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """``batch``'s training loss in fp32 and under CPU bf16 autocast (eval mode: no dropout)."""
    was_training = model.training
    model.eval()
    try:
        exact = float(reply_token_losses(model, batch)[0].mean())
        with _cpu_autocast(torch.bfloat16):
            fast = float(reply_token_losses(model, batch)[0].mean())
    finally:
        model.train(was_training)
    return exact, fast


def _grad_scaler(model: torch.nn.Module) -> torch.amp.GradScaler | None:
    """A loss scaler where gradients would underflow (fp16 autocast on CUDA), else ``None``."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    return (
        torch.amp.GradScaler("cuda") if on_cuda and compute_dtype(model) == torch.float16 else None
    )


def reply_token_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each reply token, and the row it belongs to.

    The output layer runs on the reply positions only: a prompt token's logits over the whole
    vocabulary (49k for SmolLM2) are never computed, in training or evaluation. The values are
    the usual causal-LM losses on fp32 logits.
    """
    lm = causal_lm(model)
    with packed_attention_for(lm, batch):
        hidden = lm.get_decoder()(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),  # a packed row (common.data.pack)
            use_cache=False,
        ).last_hidden_state
    return head_losses(lm, hidden, batch["labels"])


def packed_attention_for(
    lm: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> contextlib.AbstractContextManager[object]:
    """Per-sample attention (:mod:`common.packed_attention`) for a packed row on a CPU — no
    score computed across samples; the model's own attention elsewhere (padded batches, and
    GPUs, whose SDPA kernels take the block mask at little cost)."""
    positions = batch.get("position_ids")
    if (
        positions is None
        or batch.get("attention_mask") is not None
        or positions.device.type != "cpu"
        or positions.shape[0] != 1
    ):
        return contextlib.nullcontext()
    return packed_rows(lm, positions)


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a peft wrapper (LoRA layers injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_losses(
    lm: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    shifted = labels[:, 1:]
    mask = shifted != -100
    head = lm.get_output_embeddings()
    held = getattr(lm, _HEAD_ATTR, None)  # the head in bf16 for a round (frozen_weights_in)
    if held is not None and torch.is_autocast_enabled("cpu"):
        logits = torch.nn.functional.linear(hidden[:, :-1][mask], held, head.bias).float()
    else:
        logits = head(hidden[:, :-1][mask]).float()
    losses = torch.nn.functional.cross_entropy(logits, shifted[mask], reduction="none")
    return losses, mask.nonzero()[:, 0]


_HEAD_ATTR = "_fedpersona_head_in_training_dtype"


@contextlib.contextmanager
def frozen_weights_in(model: torch.nn.Module, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    """The base's frozen linear weights held in ``dtype`` for the block, restored after.

    CPU autocast casts an fp32 weight to bf16 at every call (it caches only casts of tensors
    that require gradients), so a frozen base is re-cast on every forward of every step —
    ~8 % of a SmolLM2 step on 2 cores. Holding the decoder's frozen linear weights (and the
    output layer, which may share its weight with the input embeddings and therefore gets its
    own copy) in bf16 for a round casts them once: the values are the ones autocast would
    compute, so training is unchanged. LoRA tensors, norms and embeddings stay as they are.
    """
    lm = causal_lm(model)
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    for name, module in lm.get_decoder().layers.named_modules():
        weight = getattr(module, "weight", None)
        if (
            isinstance(module, torch.nn.Linear)
            and "lora_" not in name
            and weight is not None
            and not weight.requires_grad
            and weight.dtype == torch.float32
        ):
            saved.append((weight, weight.data))
            weight.data = weight.data.to(dtype)
    head = lm.get_output_embeddings()
    if head is not None and head.weight.dtype == torch.float32:
        setattr(lm, _HEAD_ATTR, head.weight.detach().to(dtype))
    try:
        yield
    finally:
        for weight, data in saved:
            weight.data = data
        if hasattr(lm, _HEAD_ATTR):
            delattr(lm, _HEAD_ATTR)


def _is_cpu_bf16(context: contextlib.AbstractContextManager[object]) -> bool:
    return (
        isinstance(context, torch.autocast)
        and context.device == "cpu"
        and context.fast_dtype == torch.bfloat16
    )


# Decoder families whose forward takes ``inputs_embeds`` as the residual stream unchanged (no
# embedding scale inside the model), so running layers [0, k) and then [k, n) from the hidden
# state equals one pass: what HeldOutLosses and the split feedback step rely on.
SPLITTABLE = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def splittable(model: torch.nn.Module) -> bool:
    """Whether ``model``'s decoder may be run in two parts (:data:`SPLITTABLE`)."""
    return getattr(causal_lm(model).config, "model_type", None) in SPLITTABLE


@contextlib.contextmanager
def decoder_layers(decoder: torch.nn.Module, layers: slice, *, final_norm: bool):  # type: ignore[no-untyped-def]
    """Run ``decoder`` over a slice of its layers (and its final norm only if asked)."""
    saved_layers, saved_norm = decoder.layers, decoder.norm
    decoder.layers = torch.nn.ModuleList(list(saved_layers)[layers])
    if not final_norm:
        decoder.norm = torch.nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = saved_layers, saved_norm


class HeldOutLosses:
    """Reply-token losses of several versions of one model on the same samples.

    Load a version's LoRA tensors into the model (or use ``model.disable_adapter()`` for the
    base), then call :meth:`per_example` or :meth:`mean`. When the LoRA adapters start at
    decoder layer ``first_lora_layer`` > 0 (``model.lora-layers``), every version computes the
    same layers below it: their output is computed once, here, and each version runs only the
    layers above — k versions cost about one pass through the lower layers plus k through the
    upper ones (for the decoders :func:`splittable` names; elsewhere every pass is whole).

    Args:
        model: The (peft) causal LM.
        samples: Tokenized samples.
        batch_size: Samples per forward pass (packed into one row).
        first_lora_layer: The lowest decoder layer with LoRA (0: no sharing).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        samples: Sequence[Encoded],
        *,
        batch_size: int,
        first_lora_layer: int = 0,
    ) -> None:
        self.model = model
        device = next(model.parameters()).device
        chunks = [list(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
        # Each chunk packed into one row (no padding computed); a sample's reply-token count
        # splits the row's losses back into samples.
        self.batches = [{k: v.to(device) for k, v in pack(chunk).items()} for chunk in chunks]
        self.counts = [[_targets(e) for e in chunk] for chunk in chunks]
        self.lm = causal_lm(model)
        self.decoder = self.lm.get_decoder()
        n_layers = len(self.decoder.layers)
        share = 0 < first_lora_layer < n_layers and splittable(model)
        self.split = first_lora_layer if share else 0
        self.lower: list[torch.Tensor] = []
        if self.split:
            model.eval()
            with (
                torch.no_grad(),
                autocast_for(model),
                decoder_layers(self.decoder, slice(0, self.split), final_norm=False),
            ):
                self.lower = [self._hidden(input_ids=b["input_ids"], batch=b) for b in self.batches]

    @torch.no_grad()
    def above(self, layer: int) -> HeldOutLosses:
        """An evaluator of the versions that share the model's current LoRA tensors below
        decoder ``layer``: those layers run once, here, and each version only the layers from
        ``layer`` up (``blend``'s personal + w·global for every w, the global adapter living in
        the upper layers only). ``self`` when ``layer`` saves nothing."""
        if not (self.split < layer < len(self.decoder.layers) and splittable(self.model)):
            return self
        fork = copy.copy(self)
        self.model.eval()
        with autocast_for(self.model):
            inputs = self.lower or [
                self.decoder.embed_tokens(batch["input_ids"]) for batch in self.batches
            ]
            with decoder_layers(self.decoder, slice(self.split, layer), final_norm=False):
                fork.lower = [
                    self._hidden(inputs_embeds=lower, batch=batch)
                    for lower, batch in zip(inputs, self.batches, strict=True)
                ]
        fork.split = layer
        return fork

    def _hidden(self, *, batch: dict[str, torch.Tensor], **inputs: torch.Tensor) -> torch.Tensor:
        with packed_attention_for(self.lm, batch):
            out = self.decoder(**inputs, position_ids=batch["position_ids"], use_cache=False)
        return out.last_hidden_state

    @torch.no_grad()
    def _batch_losses(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batches[i]
        with autocast_for(self.model):
            if not self.split:
                return reply_token_losses(self.model, batch)
            with decoder_layers(self.decoder, slice(self.split, None), final_norm=True):
                hidden = self._hidden(inputs_embeds=self.lower[i], batch=batch)
            return head_losses(self.lm, hidden, batch["labels"])

    def per_example(self) -> list[float]:
        """Each sample's mean reply-token loss under the model's current LoRA tensors."""
        self.model.eval()
        out: list[float] = []
        for i, counts in enumerate(self.counts):
            losses, _ = self._batch_losses(i)
            out += [float(c.mean()) if c.numel() else 0.0 for c in losses.cpu().split(counts)]
        return out

    def mean(self) -> float:
        """Mean reply-token loss over all samples (per token).

        Raises:
            ValueError: If the samples hold no reply token.
        """
        self.model.eval()
        total, count = 0.0, 0
        for i in range(len(self.batches)):
            losses, _ = self._batch_losses(i)
            total += float(losses.sum())
            count += int(losses.numel())
        if count == 0:
            raise ValueError("no reply tokens to evaluate")
        return total / count


def _targets(sample: Encoded) -> int:
    """How many of ``sample``'s tokens are predicted targets (reply tokens after the first)."""
    return sum(1 for t in sample.labels[1:] if t != IGNORE_INDEX)


def unfreeze_only(model: torch.nn.Module, trainable: Sequence[str]) -> list[torch.nn.Parameter]:
    """Let gradients flow to the named parameters only; return them in model order."""
    wanted = set(trainable)
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)
        if name in wanted:
            params.append(param)
    if len(params) != len(wanted):
        raise ValueError("some trainable names are not parameters of the model")
    return params


def train_steps(
    model: torch.nn.Module,
    trainable: Sequence[str],
    samples: Sequence[Encoded],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    pad_id: int,
    precision: str = "auto",
    packed: bool = True,
    gradient_sums: dict[str, torch.Tensor] | None = None,
) -> float:
    """Run ``steps`` AdamW steps on the named parameters only; everything else is frozen.

    Batches are drawn with a ``seed``-ed RNG, so a round is reproducible. Each batch is packed
    into one row (:func:`common.data.pack`: no padding, no attention across samples; the same
    loss as the padded batch) and runs in ``precision`` (:func:`training_autocast`).

    Args:
        model: The model (its LoRA tensors already set for this round).
        trainable: Parameter names to update.
        samples: Tokenized training samples.
        steps: Number of optimizer steps.
        batch_size: Samples per step.
        learning_rate: AdamW learning rate.
        seed: Seed for batch sampling.
        pad_id: Padding token id (for ``packed=False``).
        precision: ``train.precision``: ``"auto"``, ``"float32"`` or ``"bfloat16"``.
        packed: Pack each batch into one row; ``False``: right-padded rows (the old path,
            which benchmarks compare against).
        gradient_sums: Parameter name -> fp32 CPU tensor: each step's (unscaled) gradient of
            that parameter is added to it (``personalization.update = "gradient"``).

    Returns:
        Mean training loss over the steps.

    Raises:
        ValueError: If there is nothing to train on, or the loss becomes non-finite.
    """
    if not samples:
        raise ValueError("no training samples on this device")
    params = unfreeze_only(model, trainable)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    scaler = _grad_scaler(model)
    device = next(model.parameters()).device
    rng = random.Random(seed)
    model.train()
    losses: list[float] = []
    held = contextlib.ExitStack()
    try:
        for _ in range(steps):
            chosen = [samples[rng.randrange(len(samples))] for _ in range(batch_size)]
            batch = pack(chosen) if packed else collate(chosen, pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            autocast = training_autocast(model, precision, batch)
            if _is_cpu_bf16(autocast) and not losses:  # cast the frozen base once per round
                held.enter_context(frozen_weights_in(model, torch.bfloat16))
            with autocast:
                # The mean over the batch's reply tokens, as transformers' causal-LM loss.
                loss = reply_token_losses(model, batch)[0].mean()
            if not torch.isfinite(loss):
                raise ValueError(
                    f"non-finite training loss {loss.item()}; lower train.learning-rate"
                )
            _step(model, loss, optimizer, scaler, gradient_sums)
            losses.append(float(loss.detach()))
    finally:
        held.close()
        model.eval()
        for param in params:
            param.requires_grad_(False)
            param.grad = None
    return sum(losses) / len(losses)


def _step(
    model: torch.nn.Module,
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    gradient_sums: dict[str, torch.Tensor] | None,
) -> None:
    """One optimizer step on ``loss`` (through the fp16 gradient scaler where there is one),
    each step's unscaled gradients added into ``gradient_sums`` first."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        _add_gradients(model, gradient_sums)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    if gradient_sums:
        scaler.unscale_(optimizer)
        _add_gradients(model, gradient_sums)
    scaler.step(optimizer)
    scaler.update()


def _add_gradients(model: torch.nn.Module, sums: dict[str, torch.Tensor] | None) -> None:
    """Add the named parameters' current gradients into ``sums`` (fp32, on its device)."""
    if not sums:
        return
    params = dict(model.named_parameters())
    for name, total in sums.items():
        grad = params[name].grad
        if grad is not None:
            total += grad.detach().to(total.device, torch.float32)


def _per_sample_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over samples of each sample's mean reply-token loss (per-sample DP needs this)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logp = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
    )
    mask = (labels != -100).float()
    return ((logp * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).sum()


def train_steps_dp(
    model: torch.nn.Module,
    trainable: Sequence[str],
    samples: Sequence[Encoded],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int | None,
    pad_id: int,
) -> tuple[float, float]:
    """DP-SGD (Opacus) on the named parameters: Poisson batches, per-sample clipping, noise.

    The forward pass is not autocast: Opacus' per-sample gradients need the LoRA layers'
    activations and backprops in the parameters' fp32 (peft casts them for a bf16 base).

    Per-sample gradients come from Opacus' ``GradSampleModule`` and clipping + Gaussian noise
    from its ``DPOptimizer`` (over AdamW), so an Opacus accountant fed ``(noise_multiplier,
    sample_rate, steps)`` gives this training's record-level ε. Every trainable tensor,
    personal ones included, goes through DP-SGD: in ``fedsa`` and ``dual`` the personal tensors
    shape the shared tensors' gradients, so training them without noise would void the
    guarantee on what is released.

    Returns:
        ``(mean training loss per sample, sample rate)``.

    Raises:
        ValueError: If there is nothing to train on or the loss becomes non-finite.
    """
    # isort: off
    import common.dp.opacus_quiet  # noqa: F401  (before Opacus: no second log handler)
    from opacus import GradSampleModule

    # isort: on

    if not samples:
        raise ValueError("no training samples on this device")
    sample_rate = min(1.0, batch_size / len(samples))
    params = unfreeze_only(model, trainable)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    optimizer = _dp_optimizer(
        params,
        learning_rate=learning_rate,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=max(1, round(sample_rate * len(samples))),
        seed=seed,
    )
    device = params[0].device
    # Poisson sampling of the batch
    rng: random.Random = random.SystemRandom() if seed is None else random.Random(seed)
    losses: list[float] = []
    gsm.train()
    try:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            chosen = [s for s in samples if rng.random() < sample_rate]
            if chosen:
                batch = {k: v.to(device) for k, v in collate(chosen, pad_id).items()}
                loss = _per_sample_loss_sum(gsm, batch)
                if not torch.isfinite(loss):
                    raise ValueError("non-finite training loss; lower train.learning-rate")
                loss.backward()
                losses.append(float(loss.detach()) / len(chosen))
            else:
                # An empty Poisson batch still takes a (pure-noise) step, as the analysis assumes.
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            optimizer.step()
    finally:
        _detach_dp(gsm, params, model)
    return (sum(losses) / len(losses) if losses else float("nan")), sample_rate


def _detach_dp(gsm: Any, params: list[torch.nn.Parameter], model: torch.nn.Module) -> None:
    """Leave ``model`` as DP-SGD found it: no Opacus hooks, per-sample gradients or grads,
    its parameters frozen again, in eval mode."""
    gsm.remove_hooks()
    for p in params:
        p.requires_grad_(False)
        p.grad = None
        for attr in ("grad_sample", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
    model.eval()


def _dp_optimizer(
    params: list[torch.nn.Parameter],
    *,
    learning_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    seed: int | None,
):  # type: ignore[no-untyped-def]
    """Opacus' ``DPOptimizer`` over AdamW: per-sample clipping to ``max_grad_norm`` and
    Gaussian noise of ``noise_multiplier`` times it, from the OS's randomness unless a seed is
    given (tests): a seed the server could know (round, user) would let it rebuild the noise."""
    from opacus.optimizers import DPOptimizer

    noise_seed = secrets.randbits(63) if seed is None else seed
    return DPOptimizer(
        torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="sum",
        generator=torch.Generator(device=params[0].device).manual_seed(noise_seed),
    )


def evaluate_loss(model: torch.nn.Module, samples: Sequence[Encoded], *, batch_size: int) -> float:
    """Mean per-token cross-entropy of ``model`` on the reply tokens of ``samples``.

    Raises:
        ValueError: If ``samples`` holds no reply token.
    """
    return HeldOutLosses(model, samples, batch_size=batch_size).mean()


def per_example_losses(
    model: torch.nn.Module, samples: Sequence[Encoded], *, batch_size: int
) -> list[float]:
    """Mean reply-token cross-entropy of each sample (for membership and canary audits)."""
    return HeldOutLosses(model, samples, batch_size=batch_size).per_example()
