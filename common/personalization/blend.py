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
  its held-out slice (the other half reports). It starts from the federation's prior weight
  (``personalization.mix-prior``, default 0.5; 1 in ``population``) if the global adapter
  alone beats the base model there (else from 0: a small federation's noise can swamp what
  its users share),
  steps down — to the largest smaller weight that still lowers the loss there, else to 0, its
  local-only model — when the global adapter at that weight raises the per-example loss there
  (``MIX_DROP_Z`` standard errors of the paired difference), and takes
  a larger weight only with evidence that it lowers it further (``MIX_EVIDENCE_P``). A
  brand-new user gets the global adapter alone.

Why a prior and not the device's evidence alone: a device holds a handful of held-out
examples, too few to show the small, consistent gain a federation's adapter brings (on a
``population`` run, weight 0.5 lowered the test-half loss of about 9 users in 10, while
devices waiting for evidence of a gain served the adapter to two in three); they are enough
to show harm, which is what a device must not accept.

Nothing the device trains depends on the global adapter, so joining cannot make its personal
adapter worse; the global adapter is served unless the device's own evidence says it hurts.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from scipy.stats import t as student_t

from common.personalization.base import (
    GLOBAL_ADAPTER,
    PERSONAL_ADAPTER,
    Strategy,
    adapter_of,
    compose,
    is_lora_b,
    layer_of,
)

# The weights of the global adapter a device tries (0: its local-only model; above 1: the
# federation's small, noise-averaged step taken further where the device's evidence says so).
# Up to 2: weight 4 was where users ended up worse than training alone on every `population`
# draw (two per draw at 3c97947); of the five devices that picked 4 on a draw at d2f2fcb
# (global layers 22-29, 12 test examples), all five were better off at 2 (mean gain over the
# 174 users who trained +0.003 nats), three of them from below their local-only model (two
# by more than 0.5 %).
MIX_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)
# The prior weight is dropped (to 0, the local-only model) when it raises the per-example loss
# on the selection examples by more than this many standard errors of the paired difference.
MIX_DROP_Z = 1.0
# A larger weight replaces the prior only when it lowers that loss with a one-sided p-value
# below this (Student's t on the paired per-example differences, n - 1 degrees of freedom:
# 3.7 standard errors at 5 examples, 2.6 at 16). The rule until 0d4848a, a fixed 2.5
# standard errors, is p ~ 0.12 on 2 examples and ~ 0.03 on 6: on one `population` draw the
# two users served worse than their local-only model had both jumped to weight 4 that way
# (one on 2 selection examples, one on 6). Replaying the 171 trained devices of an earlier
# `population` run (per-example losses at every weight, `simulations/mix_weights.py`, prior
# 0.5): the fixed 2.5 served weight 2 or 4 to 31 users, mean gain 0.099 nats; p 0.01 to 11,
# mean gain 0.082; both left the same one user (served the prior) worse off.
MIX_EVIDENCE_P = 0.01


def _evidence_bar(n: int) -> float:
    """Standard errors of the paired decrease that count as evidence on ``n`` examples."""
    return float(student_t.ppf(1.0 - MIX_EVIDENCE_P, n - 1))


def pick_mix_weight(
    losses: Callable[[float], list[float]],
    *,
    prior: float,
    base: list[float] | None = None,
    global_alone: list[float] | None = None,
) -> float:
    """The global adapter's weight a device serves, from ``losses(w)``: the per-example
    held-out losses (the same examples, in the same order, for every w) of personal +
    w·global.

    The prior is earned: where ``base`` and ``global_alone`` (the base model's and the global
    adapter's own losses on those examples) are given and the global adapter alone is not
    better than the base model on average — a federation whose noise swamps what its users
    share — the prior is 0. ``prior`` then stands unless the evidence says otherwise: a mean
    paired loss increase over weight 0 (the local-only model) of more than ``MIX_DROP_Z``
    standard errors steps it down to the largest smaller weight that lowers the mean loss against
    weight 0, or to 0 where none does;
    a larger weight whose mean paired decrease against ``prior`` is significant at
    ``MIX_EVIDENCE_P`` (one-sided paired t) replaces it (of those, the largest decrease).
    Fewer than two examples: weight 0.
    """
    unearned = (
        base is not None
        and global_alone is not None
        and statistics.fmean(global_alone) >= statistics.fmean(base)
    )
    if unearned:
        prior = 0.0
    current = losses(prior)
    n = len(current)
    if n < 2:
        return 0.0

    def z_score(worse: list[float], better: list[float]) -> tuple[float, float]:
        """Mean paired decrease from ``worse`` to ``better``, and that in standard errors."""
        gains = [a - b for a, b in zip(worse, better, strict=True)]
        mean = statistics.fmean(gains)
        stderr = statistics.stdev(gains) / math.sqrt(n)
        return mean, (mean / stderr if stderr > 0 else math.copysign(math.inf, mean))

    if prior > 0:
        local = losses(0.0)
        if z_score(local, current)[1] < -MIX_DROP_Z:
            # Step down rather than off: the largest smaller weight that lowered the mean loss
            # on these examples (a large prior taken too far for this user), else 0.
            for weight in sorted((w for w in MIX_WEIGHTS if 0 < w < prior), reverse=True):
                if z_score(local, losses(weight))[0] > 0:
                    return weight
            return 0.0
    best, best_gain, bar = prior, 0.0, _evidence_bar(n)
    for weight in MIX_WEIGHTS:
        if weight > prior:
            gain, z = z_score(current, losses(weight))
            if z > bar and gain > best_gain:
                best, best_gain = weight, gain
    return best


def _swap(name: str, old: str, new: str) -> str:
    return name.replace(f".{old}.", f".{new}.")


class Blend(Strategy):
    """Personal adapter trained locally; its progress federated into the global adapter.

    Args:
        global_layers: Federate only the global adapter's tensors in these decoder layers
            (``personalization.global-layers``; ``None``: all). The rest of the global adapter
            stays at its initialisation (B = 0: no effect).
        global_targets: Federate only the global adapter's tensors of these LoRA target
            modules (``personalization.global-targets``; ``None``: all).
        global_part: ``AB`` (both LoRA factors) or ``B`` (A stays at the shared
            initialisation; ``personalization.global-part``).

    Under user-level DP the noise on the mean update grows with the square root of how many
    numbers are federated while the signal does not: with few users, a small federated part
    of the adapter is what can carry signal.
    """

    def __init__(
        self,
        *,
        global_layers: tuple[int, int] | None = None,
        global_targets: tuple[str, ...] | None = None,
        global_part: str = "AB",
    ) -> None:
        if global_part not in ("AB", "B"):
            raise ValueError(f"personalization.global-part must be AB or B, got {global_part!r}")
        super().__init__(
            name="blend",
            adapters=(GLOBAL_ADAPTER, PERSONAL_ADAPTER),
            cold_start="the federation's global adapter alone",
            mix_weights=MIX_WEIGHTS,
            weight_rule=pick_mix_weight,
            local_only_personal=True,
            global_layers=global_layers,
            global_targets=global_targets,
            global_part=global_part,
        )

    def is_shared(self, name: str) -> bool:  # noqa: D102
        if adapter_of(name) != GLOBAL_ADAPTER:
            return False
        if self.global_part == "B" and not is_lora_b(name):
            return False
        if self.global_targets is not None and not any(
            f".{target}." in name for target in self.global_targets
        ):
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

    def _weighted(self, tensors: dict[str, Any], weight: float) -> dict[str, Any]:
        # personal + w·global: the global adapter's B tensors scaled by w (0: local-only).
        return compose(tensors, shared_names=[n for n in tensors if self.is_shared(n)], mix=weight)

    def serves_trained(self, weight: float | None) -> bool:  # noqa: D102
        return not weight
