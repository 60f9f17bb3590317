"""A device's own state between rounds: its personal LoRA tensors and a small JSON record.

Lives in the device's data dir (``node_config['data-dir']``; in simulation one directory per
simulated device). Writes are atomic (temp file + ``os.replace``), so a device killed
mid-write keeps its previous state. The directory also holds ``personal_adapter/``, the
complete adapter the device generates with, in peft format.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from common.atomic import atomic_write_bytes

PERSONAL_FILE = "personal.safetensors"
META_FILE = "device.json"
ADAPTER_DIR = "personal_adapter"


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
    history: list[dict] = field(default_factory=list)


class DeviceState:
    """Load and save one device's personal tensors and metadata.

    Args:
        root: The device's data dir.
        user: User id this device holds.
        strategy: Personalization strategy name.
        model: ``model.name`` and LoRA settings, as one string; state from another
            configuration is refused rather than silently mixed.
    """

    def __init__(self, root: Path, *, user: str, strategy: str, model: str, lora: str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._expect = {"user": user, "strategy": strategy, "model": model, "lora": lora}
        self.meta = self._load_meta()

    @property
    def adapter_dir(self) -> Path:
        """Where the complete personal adapter (peft format) is written."""
        return self.root / ADAPTER_DIR

    def _load_meta(self) -> DeviceMeta:
        path = self.root / META_FILE
        if not path.exists():
            return DeviceMeta(**self._expect)
        try:
            meta = DeviceMeta(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"corrupted device state {path}: {err}; restore or remove it") from err
        for key, want in self._expect.items():
            have = getattr(meta, key)
            if have != want:
                raise ValueError(
                    f"device state in {self.root} belongs to {key}={have!r}, this run uses "
                    f"{want!r}; point node-config data-dir elsewhere or remove that directory"
                )
        return meta

    def save_meta(self) -> None:
        """Persist the metadata atomically."""
        atomic_write_bytes(self.root / META_FILE, json.dumps(asdict(self.meta), indent=2).encode())

    def load_personal(self) -> dict[str, torch.Tensor] | None:
        """The stored personal tensors, or ``None`` for a device that has not trained yet.

        Raises:
            ValueError: If the file is corrupted.
        """
        path = self.root / PERSONAL_FILE
        if not path.exists():
            return None
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(
                f"corrupted personal tensors {path}: {err}; restore or remove it"
            ) from err

    def save_personal(self, tensors: dict[str, torch.Tensor]) -> None:
        """Persist the personal tensors atomically."""
        blob = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in tensors.items()}
        data = save(blob, metadata={"format": "pt", **self._expect})
        atomic_write_bytes(self.root / PERSONAL_FILE, data)
