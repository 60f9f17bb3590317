"""``blend``: a fully local personal LoRA, plus the federation's global LoRA mixed in with a
weight each device picks on its own held-out evidence.

FedDPA (NeurIPS'24) serves global + personal adapters with an instance-wise weight; here the
weight is each device's own choice, and the personal adapter is exactly what the user would
train alone:

* **Training** touches the personal adapter only, on the user's own data, with the global
  adapter switched off (its B held at zero): at weight 0 the served model *is* the local-only
  model, trained with the same steps and tokens.
* **What is sent** is that personal adapter's change this round (clipped and noised like any
  update), under the global adapter's names; the server averages the changes into the global
  adapter, which so learns what the users have in common. Both adapters start from the same
  initialisation, so the average of the changes is a change of the same LoRA.
* **Serving:** personal + w·global, where the device picks w from ``MIX_WEIGHTS`` on one half of
  its held-out slice (the other half reports): w > 0 only when the global adapter lowers the
  per-example loss there with evidence (``MIX_EVIDENCE_Z`` standard errors), else the
  local-only model stands. A brand-new user gets the global adapter alone.

Nothing the device trains depends on the global adapter, so joining cannot make its personal
adapter worse; the global adapter helps exactly where the device's evidence says it does.
"""

from __future__ import annotations

from common.personalization.base import (
    GLOBAL_ADAPTER,
    PERSONAL_ADAPTER,
    Strategy,
    adapter_of,
    is_lora_b,
    layer_of,
)

# The weights of the global adapter a device tries (0: its local-only model; above 1: the
# federation's small, noise-averaged step taken further where the device's evidence says so).
MIX_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0)
# A weight above 0 must beat the local-only model on the selection examples by this many
# standard errors of the paired per-example loss difference (one-sided, ~95 %).
MIX_EVIDENCE_Z = 1.645


def _swap(name: str, old: str, new: str) -> str:
    return name.replace(f".{old}.", f".{new}.")


class Blend(Strategy):
    """Personal adapter trained locally; its progress federated into the global adapter.

    Args:
        global_layers: Federate only the global adapter's tensors in these decoder layers
            (``personalization.global-layers``; ``None``: all). The rest of the global adapter
            stays at its initialisation (B = 0: no effect).
        global_part: ``AB`` (both LoRA factors) or ``B`` (A stays at the shared
            initialisation; ``personalization.global-part``).

    Under user-level DP the noise on the mean update grows with the square root of how many
    numbers are federated while the signal does not: with few users, a small federated part
    of the adapter is what can carry signal.
    """

    def __init__(
        self, *, global_layers: tuple[int, int] | None = None, global_part: str = "AB"
    ) -> None:
        if global_part not in ("AB", "B"):
            raise ValueError(f"personalization.global-part must be AB or B, got {global_part!r}")
        super().__init__(
            name="blend",
            adapters=(GLOBAL_ADAPTER, PERSONAL_ADAPTER),
            cold_start="the federation's global adapter alone",
            mixed=True,
            global_layers=global_layers,
            global_part=global_part,
        )

    def is_shared(self, name: str) -> bool:  # noqa: D102
        if adapter_of(name) != GLOBAL_ADAPTER:
            return False
        if self.global_part == "B" and not is_lora_b(name):
            return False
        layer = layer_of(name)
        if self.global_layers is not None and layer is not None:
            return self.global_layers[0] <= layer <= self.global_layers[1]
        return True

    def is_trainable(self, name: str) -> bool:  # noqa: D102
        return adapter_of(name) == PERSONAL_ADAPTER

    def is_personal(self, name: str) -> bool:  # noqa: D102
        return adapter_of(name) == PERSONAL_ADAPTER

    def update_source(self, name: str) -> str:  # noqa: D102
        return _swap(name, GLOBAL_ADAPTER, PERSONAL_ADAPTER)

    def init_name(self, name: str) -> str:  # noqa: D102
        return _swap(name, PERSONAL_ADAPTER, GLOBAL_ADAPTER)
