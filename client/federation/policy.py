"""The device's own privacy policy: what this device accepts from a federation's server.

A run config comes from the server. Every privacy-relevant number in it — the noise, the
cohort a device's noise share is sized by, whether SecAgg+ masks the update, who draws the
sample — is the server's *claim*; the ledger's caps are the device owner's decision. The policy
is kept in the device's encrypted store, set by its owner (``fedpersona device privacy
set …``), and every round's instructions are checked against it before anything is trained:
a round asking for less is declined with the reason, nothing charged, nothing sent but the
decline.

* ``epsilon_cap`` / ``delta`` / ``accountant`` / ``period_*``: the ledger's caps. The server's
  ``privacy.*`` keys are ignored on a device that has a policy.
* ``min_noise_multiplier``: the least σ a round may carry; a round with no noise (ε = ∞) is
  refused unless this is 0.
* ``min_cohort``: the least m_min (updates the server must aggregate before releasing a sum)
  a round may claim; each device's share of distributed noise is σC/√⌊h·m_min⌋.
* ``honest_fraction``: the largest share of a cohort the device believes honest. A round
  whose noise shares assume more (``dp.honest-fraction``) is refused: against a server that
  runs fake devices, whose masks and noise it knows, only the honest shares count.
* ``max_cohort``: the most honest devices a round may size each share for (⌊h·m_min⌋): a
  server that claims a cohort of a million would otherwise get each update with a
  thousandth of the noise.
* ``share_losses``: per-device held-out losses leave in an evaluation reply only when the
  owner allows it; otherwise they leave only summed under SecAgg+ (``eval.secure-sums``). A
  real device evaluates only the global tensors of a round it trained in, at most
  ``max_evaluations`` times per round, and serves a new global model only from such a round.
* ``share_ab_counts``: the A/B test's counts of the user's ratings leave only with the
  owner's consent, and only inside the SecAgg+ sum (never in the clear).
* ``worst_case_epsilon_cap`` (:class:`common.config.PrivacyCaps`): the ledger also charges
  each update as if it were alone — its own share the only noise (``alone``) — and, when
  this is set, declines a round that would take that ε past it.
* ``require_secagg``: distributed noise only under SecAgg+ masking (unmasked, the server sees
  each update with σ/√m_min of noise, not σ).
* ``trust_server_noise``: accept ``central`` noise, which the server adds to the unmasked sum
  and the device cannot verify.
* ``trust_server_sampling``: credit the server's claimed sampling rate (privacy amplification).
  Without it a round the device joins costs one Gaussian mechanism at sampling rate 1 — unless
  the device drew its own participation coin (a simulated user hosted on a node does).

Whatever the policy, a device never accepts server-set work beyond :data:`KNOB_LIMITS`.

A simulated device's owner is whoever runs the simulation: its policy is the simulation's run
config (:meth:`DevicePolicy.from_run_config`), fixed when its store is created.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from client.federation.ledger import Charges, PrivacyLedger
from client.store import LocalStore, StoreCorrupted
from common.config import PrivacyCaps, RunConfig, finite_number
from common.dp.privatize import Privatize

POLICY_BLOB = "privacy_policy"
# Version 2 adds the VERSION_2_KEYS; a version-1 policy loads with their defaults (its owner
# never chose them).
POLICY_VERSION = 2

# Upper bounds on work a server can ask of a device (each a run-config key and its attribute
# path): a server must not exhaust a device's CPU, memory or disk. Run-config parsing bounds
# the others (data.max-seq-len <= 4096, model.lora-r <= 256, ab.interactions <= 64).
KNOB_LIMITS: dict[str, tuple[str, int]] = {
    "train.local-steps": ("train.local_steps", 1_000),
    "train.batch-size": ("train.batch_size", 256),
    "data.max-test-samples": ("data.max_test_samples", 1_024),
    "data.max-select-samples": ("data.max_select_samples", 1_024),
    "audit.canaries": ("audit.canaries", 64),
    "audit.canary-repeats": ("audit.canary_repeats", 100),
}


# A simulation's devices accept the cohorts their owner, the simulation, sizes.
SIMULATION_MAX_COHORT = 1_000_000_000
VERSION_2_KEYS = (
    "honest_fraction",
    "max_cohort",
    "worst_case_epsilon_cap",
    "share_losses",
    "max_evaluations",
    "share_ab_counts",
)


class PolicyRefused(RuntimeError):
    """The round's instructions ask for less privacy (or more work) than the device accepts."""


def _get(cfg: RunConfig, path: str) -> Any:
    value: Any = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


@dataclass(frozen=True)
class DevicePolicy(PrivacyCaps):
    """What a device accepts: its caps (:class:`common.config.PrivacyCaps`) and the terms of a
    round; see the module docstring for each field."""

    min_noise_multiplier: float = 1.0
    min_cohort: int = 8
    honest_fraction: float = 0.5
    max_cohort: int = 10_000
    require_secagg: bool = True
    trust_server_noise: bool = False
    trust_server_sampling: bool = False
    share_losses: bool = False
    max_evaluations: int = 1
    share_ab_counts: bool = False

    def _checks(self) -> list[tuple[bool, str, str]]:
        checks = [
            *super()._checks(),
            (
                finite_number(self.min_noise_multiplier) and self.min_noise_multiplier >= 0,
                "min-noise-multiplier",
                ">= 0",
            ),
            (type(self.min_cohort) is int and self.min_cohort >= 1, "min-cohort", ">= 1"),
            (
                finite_number(self.honest_fraction) and 0 < self.honest_fraction <= 1,
                "honest-fraction",
                "in (0, 1]",
            ),
            (type(self.max_cohort) is int and self.max_cohort >= 1, "max-cohort", ">= 1"),
            (
                type(self.max_evaluations) is int and self.max_evaluations >= 1,
                "max-evaluations",
                ">= 1",
            ),
        ]
        for name in (
            "require_secagg",
            "trust_server_noise",
            "trust_server_sampling",
            "share_losses",
            "share_ab_counts",
        ):
            checks.append((type(getattr(self, name)) is bool, name.replace("_", "-"), "a bool"))
        return checks

    @staticmethod
    def _invalid(key: str, what: str) -> str:
        return f"device privacy policy: {key} must be {what}"

    # -- where it comes from -------------------------------------------------------------

    @classmethod
    def from_run_config(cls, cfg: RunConfig) -> DevicePolicy:
        """A simulated device's policy: exactly what the simulation's own config asks."""
        p, dp = cfg.privacy, cfg.dp
        return cls(
            **asdict(p.caps),
            min_noise_multiplier=dp.noise_multiplier if dp.adds_noise else 0.0,
            min_cohort=1,
            honest_fraction=dp.honest_fraction,
            max_cohort=SIMULATION_MAX_COHORT,
            require_secagg=dp.distributed and cfg.secagg.enabled,
            trust_server_noise=dp.noise_mode == "central",
            trust_server_sampling=p.verifiable_sampling,
            # The simulation reads its own devices' stores: its per-user tables.
            share_losses=True,
            share_ab_counts=True,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form (with a version)."""
        return {"version": POLICY_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, state: Any) -> DevicePolicy:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: Wrong version, missing or unknown keys, or an invalid value.
        """
        names = {f.name for f in fields(cls)}
        version = state.get("version") if isinstance(state, dict) else None
        if version not in (1, POLICY_VERSION):
            raise ValueError(f"device privacy policy must be version 1 to {POLICY_VERSION}")
        if version == 1:  # kept before these keys existed: their defaults
            state = {**{k: getattr(cls(), k) for k in VERSION_2_KEYS}, **state}
        if set(state) != names | {"version"}:
            raise ValueError(f"device privacy policy must have exactly the keys {sorted(names)}")
        return cls(**{k: v for k, v in state.items() if k != "version"})

    @classmethod
    def load(cls, store: LocalStore) -> DevicePolicy | None:
        """The policy kept in ``store``, or ``None`` if it has none.

        Raises:
            ValueError: If the stored policy is corrupted (the device then refuses to run).
        """
        try:
            state = store.get_json(POLICY_BLOB)
        except StoreCorrupted as err:
            raise ValueError(f"corrupted device privacy policy: {err}; restore the store") from err
        return None if state is None else cls.from_dict(state)

    @classmethod
    def of(cls, store: LocalStore) -> DevicePolicy:
        """The policy a device with ``store`` enforces: the one kept there, else the defaults.

        Raises:
            ValueError: If the stored policy is corrupted.
        """
        return cls.load(store) or cls()

    def save(self, store: LocalStore) -> None:
        """Keep the policy in ``store`` (one transaction)."""
        store.put_json(POLICY_BLOB, self.to_dict())

    def with_changes(self, **changes: Any) -> DevicePolicy:
        """A copy with ``changes`` (validated)."""
        return replace(self, **changes)

    # -- what it decides -----------------------------------------------------------------

    def refusal(self, cfg: RunConfig, *, num_partitions: int, masked: bool) -> str | None:
        """Why this device declines a round run under ``cfg``, or ``None`` if it accepts.

        Args:
            cfg: The run config the server sent.
            num_partitions: The federation size the device sizes its noise share by.
            masked: The update will leave under SecAgg+ masking.
        """
        for key, (path, limit) in KNOB_LIMITS.items():
            value = _get(cfg, path)
            if value > limit:
                return f"{key} = {value} is above this device's limit {limit}"
        dp = cfg.dp
        sigma = dp.noise_multiplier if dp.adds_noise else 0.0
        if sigma < self.min_noise_multiplier:
            what = "no noise (ε = ∞)" if sigma == 0 else f"noise multiplier σ = {sigma:g}"
            return (
                f"the round asks for {what}; this device's policy requires σ >= "
                f"{self.min_noise_multiplier:g}"
            )
        if sigma > 0 and dp.noise_mode == "central" and not self.trust_server_noise:
            return (
                "the round asks for central noise, which the server adds and this device cannot "
                "verify; its policy does not trust server-added noise"
            )
        if dp.distributed:
            if self.require_secagg and not masked:
                return (
                    "the round asks for distributed noise without SecAgg+ masking: the server "
                    "would see this device's update with only its share of the noise"
                )
            m_min = cfg.m_min(num_partitions)
            if m_min < self.min_cohort:
                return (
                    f"the round sizes each device's noise share for a cohort of {m_min} "
                    f"(m_min); this device's policy requires at least {self.min_cohort}"
                )
            if dp.honest_fraction > self.honest_fraction:
                return (
                    f"the round sizes each device's noise share as if {dp.honest_fraction:g} of "
                    f"a cohort were honest (dp.honest-fraction); this device assumes at most "
                    f"{self.honest_fraction:g} (a server's own devices add noise it can remove)"
                )
            honest = cfg.honest_cohort(num_partitions)
            if honest > self.max_cohort:
                return (
                    f"the round sizes each device's noise share for {honest} honest devices; "
                    f"this device's policy sizes its share for at most {self.max_cohort}"
                )
        return None

    def planned_charges(
        self,
        cfg: RunConfig,
        ledger: PrivacyLedger,
        *,
        num_train: int,
        server_round: int,
        num_partitions: int,
        run: str = "",
        self_sampled: bool = False,
        rounding: tuple[float, float, float] | None = None,
    ) -> Charges:
        """The ``(record, user, alone)`` charges of round ``server_round`` of run ``run`` for
        a device with ``num_train`` training samples in a federation of ``num_partitions``,
        each ``(σ, q, steps)`` or ``None``; in ``skellam`` mode the user and alone charges
        carry the round's ``rounding`` as a fourth element
        (:attr:`common.dp.discrete.DiscreteParams.charge`).

        User level: a round the device joins costs one Gaussian mechanism at q = 1 (rounds it
        sits out cost nothing) unless the policy credits the sampling (:meth:`sample_rate`).
        With the credit every round of the run counts at rate q, so joining round t charges
        the rounds of this run since the device's last charge in it (all t in a new run) —
        the same history the server's accountant holds.

        Alone (the worst case, every other device of the cohort the server's): the update
        with its own noise share only, one mechanism at q = 1 with σ = share / C.
        """
        dp = cfg.dp
        record = None
        if dp.local_enabled:
            q = min(1.0, cfg.train.batch_size / max(num_train, 1))
            record = (dp.local_noise_multiplier, q, cfg.train.local_steps)
        user = alone = None
        if dp.adds_noise:
            q = self.sample_rate(cfg, self_sampled=self_sampled)
            steps = 1
            if q < 1.0:
                steps = max(1, server_round - ledger.last_round(run))
            user = (dp.noise_multiplier, q, steps)
            if dp.distributed:
                alone = (Privatize.of(cfg, num_partitions).alone_noise_multiplier, 1.0, 1)
            if dp.discrete:
                if rounding is None:
                    raise ValueError("a skellam round's charge needs its rounding")
                user = (*user, tuple(rounding))
                alone = (*alone, tuple(rounding)) if alone is not None else None
        return Charges(record, user, alone)

    def sample_rate(self, cfg: RunConfig, *, self_sampled: bool) -> float:
        """The sampling rate this device credits for a round it joins: the server's
        ``fraction-train`` only where the device drew its own participation coin at that rate,
        or its owner trusts the server's sampling claim; else 1 (no amplification)."""
        trusted = self.trust_server_sampling and cfg.privacy.verifiable_sampling
        return cfg.fraction_train if (self_sampled or trusted) else 1.0
