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

from common.personalization.base import GLOBAL_ADAPTER, PERSONAL_ADAPTER, Strategy, adapter_of

# The weights of the global adapter a device tries (0: its local-only model).
MIX_WEIGHTS = (0.0, 0.25, 0.5, 1.0)
# A weight above 0 must beat the local-only model on the selection examples by this many
# standard errors of the paired per-example loss difference (one-sided, ~98 %).
MIX_EVIDENCE_Z = 2.0


def _swap(name: str, old: str, new: str) -> str:
    return name.replace(f".{old}.", f".{new}.")


class Blend(Strategy):
    """Personal adapter trained locally; its progress federated into the global adapter."""

    def __init__(self) -> None:
        super().__init__(
            name="blend",
            adapters=(GLOBAL_ADAPTER, PERSONAL_ADAPTER),
            cold_start="the federation's global adapter alone",
            mixed=True,
        )

    def is_shared(self, name: str) -> bool:  # noqa: D102
        return adapter_of(name) == GLOBAL_ADAPTER

    def is_trainable(self, name: str) -> bool:  # noqa: D102
        return adapter_of(name) == PERSONAL_ADAPTER

    def is_personal(self, name: str) -> bool:  # noqa: D102
        return adapter_of(name) == PERSONAL_ADAPTER

    def update_source(self, name: str) -> str:  # noqa: D102
        return _swap(name, GLOBAL_ADAPTER, PERSONAL_ADAPTER)

    def init_name(self, name: str) -> str:  # noqa: D102
        return _swap(name, PERSONAL_ADAPTER, GLOBAL_ADAPTER)
