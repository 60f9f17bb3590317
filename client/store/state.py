"""A device's model state between rounds, kept in its encrypted :class:`~client.store.LocalStore`.

Three blobs, each written in one transaction (a device killed mid-write keeps the previous
version):

``personal``  the personal LoRA tensors (safetensors bytes) — never leave the device;
``global``    the last global shared tensors the federation sent (so the assistant can compose
              global + personal without a server);
``device``    a JSON record: user, strategy, model/LoRA fingerprint, rounds, loss history.

State written under another user, strategy or LoRA configuration is refused rather than
silently mixed.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from client.federation.policy import DevicePolicy
from client.store import API_TOKEN, LocalStore, StoreCorrupted
from common.config import ModelConfig, RunConfig, parse_run_config

if TYPE_CHECKING:  # torch is imported by the tensor functions only: status needs no model
    import torch

logger = logging.getLogger(__name__)

PERSONAL_BLOB = "personal"
GLOBAL_BLOB = "global"
META_BLOB = "device"
# The run-config subset a device keeps to rebuild its model (settings_from).
SETTINGS_BLOB = "settings"
# The assistant's evidence (client.assistant.evidence) and its installed expert adapters.
GATE_BLOB = "gate"
DRIFT_BLOB = "drift"
EXPERTS_BLOB = "experts"
# The user id of a device that has never been in a federation (set up by `device init`).
LOCAL_USER = "local"


# Run-config keys a device keeps so that its assistant can rebuild the federation's model.
SETTINGS_PREFIXES = ("model.", "personalization.", "privacy.", "data.max-seq-len")


def settings_from(cfg: RunConfig) -> dict[str, Any]:
    """The subset of a run config the device needs to rebuild its model on its own."""
    return {k: v for k, v in cfg.to_flat().items() if k.startswith(SETTINGS_PREFIXES)}


def init_device(
    store: LocalStore,
    *,
    model: str = "smollm2",
    strategy: str = "blend",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a new device's settings, an empty profile and an API token into ``store``.

    Raises:
        ValueError: If the settings are invalid (the message names the key).
    """
    from client.assistant.profile import Profile

    flat = {"model.name": model, "personalization.strategy": strategy, **(overrides or {})}
    settings = settings_from(parse_run_config(flat))
    store.put_json(SETTINGS_BLOB, settings)
    if store.get_profile() is None:
        store.put_profile(Profile().to_dict())
    if store.get_meta(API_TOKEN) is None:
        rotate_api_token(store)
    if DevicePolicy.load(store) is None:  # the owner changes it with `device privacy set`
        DevicePolicy().save(store)
    return settings


def rotate_api_token(store: LocalStore) -> str:
    """Give the local API a new bearer token (the old one stops working at once, in a running
    ``device serve`` too: it reads the token from the store on every request)."""
    token = secrets.token_urlsafe(32)
    store.set_meta(API_TOKEN, token)
    return token


def lora_fingerprint(m: ModelConfig) -> str:
    """LoRA settings as one string: state trained under other settings is refused."""
    return (
        f"r={m.lora_r},alpha={m.lora_alpha},targets={','.join(m.lora_targets)},seed={m.init_seed}"
        + (f",layers={m.lora_layers}" if m.lora_layers else "")
    )


@dataclass
class DeviceMeta:
    """What the device remembers besides tensors."""

    user: str
    strategy: str
    model: str
    lora: str
    base_loss: float | None = None
    rounds_trained: int = 0
    last_round: int = 0
    # Latest held-out losses from the federation's evaluate round: the assistant uses the
    # personal adapter only once it beats the global one (cold start).
    global_loss: float | None = None
    personal_loss: float | None = None
    history: list[dict] = field(default_factory=list)
    # ``blend``: the weight of the global adapter in the served model, picked on held-out data.
    mix_weight: float | None = None


def _optional_loss(v: Any) -> bool:
    # NaN/inf are numbers here: a diverged evaluation is a fact the device itself records.
    return v is None or type(v) in (int, float)


def _count(v: Any) -> bool:
    return type(v) is int and v >= 0


# What each stored DeviceMeta field must hold: a check and its description for the error.
META_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: (lambda v: type(v) is str, "a string") for k in ("user", "strategy", "model", "lora")},
    **{
        k: (_optional_loss, "null or a number")
        for k in ("base_loss", "global_loss", "personal_loss", "mix_weight")
    },
    "rounds_trained": (_count, "a non-negative integer"),
    "last_round": (_count, "a non-negative integer"),
    "history": (
        lambda v: type(v) is list and all(type(h) is dict for h in v),
        "a list of objects",
    ),
}


# LoRA tensors are small-valued; fp16 keeps 11 significant bits (vs bf16's 8) and halves the
# bytes a user's state takes on the device. Out-of-range tensors stay fp32.
FP16_SAFE = 60_000.0


def _compact(t: torch.Tensor) -> torch.Tensor:
    import torch

    t = t.detach().to("cpu", torch.float32)
    if t.numel() and float(t.abs().max()) < FP16_SAFE:
        return t.to(torch.float16).contiguous()
    return t.contiguous()


def as_stored(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` exactly as the store will give them back (fp32, rounded through fp16 where
    :func:`tensors_to_bytes` keeps fp16): what a device evaluates is then what it serves, and
    what a replay of its stored tensors measures."""
    import torch

    return {n: _compact(t).to(torch.float32) for n, t in tensors.items()}


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialize tensors to safetensors bytes (fp16 where the values fit, else fp32)."""
    from safetensors.torch import save

    blob = {n: _compact(t) for n, t in tensors.items()}
    return save(blob, metadata={"format": "pt", **metadata})


def tensors_from_bytes(data: bytes, what: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`tensors_to_bytes`.

    Raises:
        ValueError: If ``data`` is not a valid safetensors payload, or a tensor holds NaN/inf.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = {n: t.to(torch.float32) for n, t in load(data).items()}
    except (SafetensorError, ValueError) as err:
        raise ValueError(f"corrupted {what} tensors in the device store: {err}") from err
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"corrupted {what} tensors in the device store: {name!r} holds non-finite "
                "values; restore the store from a backup or retrain"
            )
    return tensors


class DeviceState:
    """Load and save one device's personal tensors and metadata.

    Args:
        store: The device's open LocalStore.
        user: User id this device holds.
        strategy: Personalization strategy name.
        model: ``model.name``.
        lora: LoRA settings as one string.
    """

    def __init__(
        self, store: LocalStore, *, user: str, strategy: str, model: str, lora: str
    ) -> None:
        self.store = store
        self._expect = {"user": user, "strategy": strategy, "model": model, "lora": lora}
        self.meta = self._load_meta()

    def _load_meta(self) -> DeviceMeta:
        try:
            raw = self.store.get_json(META_BLOB)
        except StoreCorrupted as err:
            raise ValueError(f"corrupted device state: {err}") from err
        if raw is None:
            return DeviceMeta(**self._expect)
        try:
            meta = DeviceMeta(**raw)
        except TypeError as err:
            raise ValueError(
                f"corrupted device state in {self.store.root}: {err}; restore the store"
            ) from err
        for key, (valid, what) in META_TYPES.items():
            value = getattr(meta, key)
            if not valid(value):
                raise ValueError(
                    f"corrupted device state in {self.store.root}: {key} must be {what}, got "
                    f"{value!r:.80}; restore the store"
                )
        for key, want in self._expect.items():
            have = getattr(meta, key)
            if have != want:
                raise ValueError(
                    f"device state in {self.store.root} belongs to {key}={have!r}, this run "
                    f"uses {want!r}; point node-config data-dir elsewhere or forget that store"
                )
        return meta

    def save_meta(self) -> None:
        """Persist the metadata (one transaction)."""
        self.store.put_json(META_BLOB, asdict(self.meta))

    def load_personal(self) -> dict[str, torch.Tensor] | None:
        """The stored personal tensors, or ``None`` for a device that has not trained yet."""
        data = self.store.get_blob(PERSONAL_BLOB)
        return None if data is None else tensors_from_bytes(data, "personal")

    def save_personal(self, tensors: dict[str, torch.Tensor]) -> None:
        """Persist the personal tensors (one transaction)."""
        self.store.put_blob(PERSONAL_BLOB, tensors_to_bytes(tensors, self._expect))

    def update_personal(
        self, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]
    ) -> None:
        """Persist personal tensors trained from ``before`` to ``after``, without losing
        another writer's update: ``device serve``'s feedback and the worker's federated round
        both read, train and write them, from separate processes. Read and written in one
        write transaction (or at the commit of the open batch): if the stored tensors are
        still ``before``, ``after`` is written; if someone else changed them meanwhile, their
        value plus this update (``stored + after − before``) — both updates land.
        """
        import torch

        names = list(after)

        def merge(current: bytes | None) -> bytes:
            stored = None if current is None else tensors_from_bytes(current, "personal")
            if stored is None or all(
                n in stored and n in before and torch.equal(stored[n], before[n].to(stored[n]))
                for n in names
            ):
                return tensors_to_bytes(after, self._expect)
            logger.info("personal tensors changed while training: both updates kept")
            merged = {
                n: stored[n] + (after[n] - before[n].to(after[n])).to(stored[n])
                if n in stored and n in before
                else after[n]
                for n in names
            }
            return tensors_to_bytes(merged, self._expect)

        self.store.put_blob_with(PERSONAL_BLOB, merge)

    def load_global(self) -> dict[str, torch.Tensor] | None:
        """The last global shared tensors received, or ``None``."""
        data = self.store.get_blob(GLOBAL_BLOB)
        return None if data is None else tensors_from_bytes(data, "global")

    def save_global(self, tensors: dict[str, torch.Tensor]) -> None:
        """Keep the latest global shared tensors."""
        self.store.put_blob(GLOBAL_BLOB, tensors_to_bytes(tensors, self._expect))


# The owner's pause switch (`fedpersona device federation pause`, the web app): while set, the
# device declines every round, charging nothing. Metadata (the time it was set), not a blob.
PAUSED_META = "federation_paused"


def paused_since(store: LocalStore) -> float | None:
    """When the owner paused the federation on this device, or ``None`` if it takes part."""
    value = store.get_meta(PAUSED_META, "")
    try:
        return float(value) if value else None
    except ValueError:
        return None


def set_paused(store: LocalStore, paused: bool) -> None:
    """Pause (decline every round from now on) or resume taking part."""
    store.set_meta(PAUSED_META, str(time.time()) if paused else "")
