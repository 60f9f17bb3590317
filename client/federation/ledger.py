"""The device's privacy ledger: what this device has spent, and whether it may spend more.

Two budgets, each an Opacus accountant history:

* **record-level** — local DP-SGD steps on the shared parameters (needs no trust in anyone);
* **user-level** — the federation's Gaussian noise on the aggregate, charged only for rounds in
  which this device actually sent an update. With no verifiable sampling the device charges
  each round at sample rate 1 (no amplification credit).

And a third budget, the worst case the user-level ε assumes away:

* **alone** — each update the device sent with its own noise share as the only noise (σ =
  share / C, q = 1; kept on the round's user-level event): what a server learns if every
  other member of the device's cohorts is its own (fake devices whose masks and noise it
  knows). Capped by ``worst-case-epsilon-cap`` when the owner sets one; always reported.

Before training, :meth:`PrivacyLedger.check` computes what the round would cost and raises
:class:`BudgetExhausted` if either ε would pass ``privacy.epsilon-cap``; the device then
declines the round. Lifetime totals are never erased: an optional per-period cap (e.g. 30
days) limits what a period may spend on top of, not instead of, the lifetime cap.

Each save also stores the lifetime ε of both kinds, computed by the accountant from the saved
history, so that ``status`` and ``budget`` can show them without loading Opacus (and torch).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from client.store import LocalStore, StoreCorrupted
from common.config import PrivacyCaps

# Version 2 adds "epsilon", the lifetime ε per kind computed at save time; version 3 adds each
# event's "run" (the federation run it was charged in: round numbers restart with each run).
# Older ledgers still load (their ε is computed when asked for; their events' run is "").
# Version 4 lets a user-level event carry "discrete": a skellam round's rounding
# (Δ1/C, Δ2/C, s·C), which its ε depends on (common/dp/accounting.py).
# Version 5 lets a user-level event carry "alone_noise_multiplier": the σ of that round's
# update with only this device's noise share (the "alone" budget, ALONE).
LEDGER_VERSION = 5
LEDGER_BLOB = "ledger"
KINDS = ("record", "user")  # the kinds of events
ALONE = "alone"  # the worst-case budget, read off the user-level events that carry ALONE_KEY
BUDGETS = (*KINDS, ALONE)
ALONE_KEY = "alone_noise_multiplier"
EVENT_KEYS = {"kind", "time", "run", "round", "noise_multiplier", "sample_rate", "steps"}
DISCRETE_KEY = "discrete"
DECLINED_KEYS = {"round", "time", "reason"}


def _rounding(v: Any) -> bool:
    """A skellam event's rounding: three finite positive numbers (Δ1/C, Δ2/C, s·C)."""
    return type(v) is list and len(v) == 3 and all(_real(x) and x > 0 for x in v)


def epsilon(history: list[tuple], *, delta: float, accountant: str) -> float:
    """ε of ``history`` from the Opacus accountant (imported here: it loads torch)."""
    from common.dp.accounting import epsilon as accountant_epsilon

    return accountant_epsilon(history, delta=delta, accountant=accountant)


def _real(v: Any) -> bool:
    """A finite JSON number (``bool`` is not a number here)."""
    return type(v) in (int, float) and math.isfinite(v)


# What each event value must be; a NaN or a string would make ε NaN or crash the accountant.
EVENT_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "time": (_real, "a finite number"),
    "run": (lambda v: type(v) is str, "a string"),
    "round": (lambda v: type(v) is int, "an integer"),
    "noise_multiplier": (lambda v: _real(v) and v >= 0, "a finite number >= 0"),
    "sample_rate": (lambda v: _real(v) and 0 < v <= 1, "a number in (0, 1]"),
    "steps": (lambda v: type(v) is int and v >= 1, "an integer >= 1"),
}


class BudgetExhausted(RuntimeError):
    """Releasing this round's update would push ε past a cap."""


class Charges(NamedTuple):
    """One round's planned charges per kind, each ``(σ, q, steps)`` (a skellam round's with
    its rounding as a fourth element) or ``None``."""

    record: tuple | None
    user: tuple | None
    alone: tuple | None = None


class PrivacyLedger:
    """Record- and user-level privacy spend of one device, with caps and persistence."""

    def __init__(self, policy: PrivacyCaps) -> None:
        self.policy = policy
        # Each event: {"kind", "time", "round", "noise_multiplier", "sample_rate", "steps"}.
        self.events: list[dict[str, Any]] = []
        self.declined: list[dict[str, Any]] = []
        # Lifetime ε per kind for exactly these events, once computed (or loaded).
        self._epsilon: dict[str, float] | None = dict.fromkeys(BUDGETS, 0.0)

    def _history(self, kind: str, since: float | None = None) -> list[tuple]:
        """The accountant history of budget ``kind`` (:data:`BUDGETS`), from ``since`` on."""
        recent = [e for e in self.events if since is None or e["time"] >= since]
        if kind == ALONE:  # each update alone: one mechanism at q = 1 with its own share
            return [
                (e[ALONE_KEY], 1.0, 1) + ((tuple(e[DISCRETE_KEY]),) if DISCRETE_KEY in e else ())
                for e in recent
                if ALONE_KEY in e
            ]
        return [
            (e["noise_multiplier"], e["sample_rate"], e["steps"])
            + ((tuple(e[DISCRETE_KEY]),) if DISCRETE_KEY in e else ())
            for e in recent
            if e["kind"] == kind
        ]

    def epsilon(self, kind: str) -> float:
        """Lifetime ε of budget ``kind`` (``record``, ``user`` or ``alone``)."""
        if kind not in BUDGETS:
            raise ValueError(f"unknown budget kind {kind!r}")
        if self._epsilon is None:
            self._epsilon = {
                k: epsilon(
                    self._history(k), delta=self.policy.delta, accountant=self.policy.accountant
                )
                for k in BUDGETS
            }
        return self._epsilon[kind]

    def rounds_charged(self) -> int:
        """Number of rounds with a user-level charge (rounds this device sent an update)."""
        return len({(e["run"], e["round"]) for e in self.events if e["kind"] == "user"})

    def last_round(self, run: str) -> int:
        """The last round of federation run ``run`` with a user-level charge (0: none)."""
        return max(
            (e["round"] for e in self.events if e["kind"] == "user" and e["run"] == run),
            default=0,
        )

    def _after(self, kind: str, planned: list[tuple], since: float | None) -> float:
        return epsilon(
            self._history(kind, since) + planned,
            delta=self.policy.delta,
            accountant=self.policy.accountant,
        )

    def check(
        self,
        *,
        record: tuple | None,
        user: tuple | None,
        alone: tuple | None = None,
        now: float | None = None,
    ) -> dict[str, float]:
        """What spending ``record`` / ``user`` / ``alone`` (each ``(σ, q, steps)``, a skellam
        round's with its rounding as a fourth element; :class:`Charges`) would bring ε to.

        Returns:
            ``{kind: ε_after}`` for each of :data:`BUDGETS`.

        Raises:
            BudgetExhausted: If a lifetime or period cap would be exceeded (``alone``: the
                worst-case cap, when set).
        """
        now = time.time() if now is None else now
        result: dict[str, float] = {}
        for kind, planned in zip(BUDGETS, (record, user, alone), strict=True):
            steps = [planned] if planned is not None else []
            eps = self._after(kind, steps, None)
            result[kind] = eps
            if kind == ALONE:
                cap = self.policy.worst_case_epsilon_cap
                if steps and cap > 0 and eps > cap:
                    raise BudgetExhausted(
                        f"worst-case budget exhausted: this device's updates alone (its own "
                        f"noise share the only noise) would reach ε = {eps:.3f} > cap "
                        f"{cap:.3f}; the device declines this round. Raise "
                        "`worst-case-epsilon-cap`, or join federations with a higher "
                        "dp.share-floor."
                    )
                continue
            if steps and eps > self.policy.epsilon_cap:
                raise BudgetExhausted(
                    f"privacy budget exhausted: {kind}-level ε would reach {eps:.3f} > cap "
                    f"{self.policy.epsilon_cap:.3f} (δ={self.policy.delta:g}); the device "
                    "declines this round. Raise `privacy.epsilon-cap` or increase the noise."
                )
            if steps and self.policy.period_days > 0 and self.policy.period_epsilon_cap > 0:
                since = now - self.policy.period_days * 86400
                period_eps = self._after(kind, steps, since)
                if period_eps > self.policy.period_epsilon_cap:
                    raise BudgetExhausted(
                        f"period budget exhausted: {kind}-level ε in the last "
                        f"{self.policy.period_days:g} days would reach {period_eps:.3f} > "
                        f"{self.policy.period_epsilon_cap:.3f}; wait for the next period"
                    )
        return result

    def charge(
        self,
        *,
        server_round: int,
        record: tuple | None,
        user: tuple | None,
        alone: tuple | None = None,
        now: float | None = None,
        run: str = "",
    ) -> None:
        """Record the spend of round ``server_round`` of federation run ``run``, whose update
        was actually sent. ``alone`` (its σ) rides on the user-level event: the same update.

        Raises:
            ValueError: An ``alone`` charge without a user-level one.
        """
        now = time.time() if now is None else now
        if alone is not None and user is None:
            raise ValueError("an alone charge belongs to a user-level charge of the same round")
        for kind, planned in zip(KINDS, (record, user), strict=True):
            if planned is None:
                continue
            sigma, q, steps = planned[:3]
            self._epsilon = None
            event: dict[str, Any] = {
                "kind": kind,
                "time": now,
                "run": str(run),
                "round": int(server_round),
                "noise_multiplier": float(sigma),
                "sample_rate": float(q),
                "steps": int(steps),
            }
            if len(planned) == 4 and planned[3] is not None:
                event[DISCRETE_KEY] = [float(v) for v in planned[3]]
            if kind == "user" and alone is not None:
                event[ALONE_KEY] = float(alone[0])
            self.events.append(event)

    def note_declined(self, *, server_round: int, reason: str, now: float | None = None) -> None:
        """Remember a round this device declined (nothing was spent)."""
        self.declined.append(
            {
                "round": int(server_round),
                "time": time.time() if now is None else now,
                "reason": reason,
            }
        )

    def summary(self) -> dict[str, float]:
        """Scalars for status displays: ε spent per kind, cap and charged rounds."""
        return {
            "record_epsilon": self.epsilon("record"),
            "user_epsilon": self.epsilon("user"),
            "alone_epsilon": self.epsilon("alone"),
            "epsilon_cap": self.policy.epsilon_cap,
            "delta": self.policy.delta,
            "rounds_charged": float(self.rounds_charged()),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restore the ledger (JSON-serializable)."""
        return {
            "version": LEDGER_VERSION,
            "accountant": self.policy.accountant,
            "delta": self.policy.delta,
            "events": [dict(e) for e in self.events],
            "declined": [dict(d) for d in self.declined],
            "epsilon": {kind: self.epsilon(kind) for kind in BUDGETS},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`.

        Raises:
            ValueError: On missing keys, a different version/accountant/δ, or bad events.
        """
        required = {"version", "accountant", "delta", "events", "declined"}
        version = state.get("version") if isinstance(state, dict) else None
        if type(version) is not int or version not in range(1, LEDGER_VERSION + 1):
            raise ValueError(f"ledger version {version!r:.40} is not 1 to {LEDGER_VERSION}")
        if version >= 2:
            required = required | {"epsilon"}
        if set(state) != required:
            raise ValueError(f"ledger state must have exactly the keys {sorted(required)}")
        if (
            state["accountant"] != self.policy.accountant
            or not _real(state["delta"])
            or not math.isclose(state["delta"], self.policy.delta)
        ):
            raise ValueError(
                f"ledger was kept with accountant={state['accountant']!r:.40}, "
                f"δ={state['delta']!r:.40}; this policy uses {self.policy.accountant!r}, "
                f"δ={self.policy.delta}"
            )
        for key in ("events", "declined"):
            if type(state[key]) is not list:
                raise ValueError(f"ledger {key} must be a list, got {state[key]!r:.80}")
        events = []
        for e in state["events"]:
            if version < 3 and isinstance(e, dict) and "run" not in e:
                e = {**e, "run": ""}
            if (
                not isinstance(e, dict)
                or set(e) - {DISCRETE_KEY, ALONE_KEY} != EVENT_KEYS
                or e["kind"] not in KINDS
            ):
                raise ValueError(f"malformed ledger event {e!r:.200}")
            if ALONE_KEY in e and (
                e["kind"] != "user" or not _real(e[ALONE_KEY]) or e[ALONE_KEY] < 0
            ):
                raise ValueError(
                    f"invalid ledger event: {ALONE_KEY} must be a user-level event's finite "
                    f"number >= 0 (event {e!r:.200})"
                )
            if DISCRETE_KEY in e and (e["kind"] != "user" or not _rounding(e[DISCRETE_KEY])):
                raise ValueError(
                    "invalid ledger event: discrete must be a user-level event's three "
                    f"positive numbers (event {e!r:.200})"
                )
            for key, (valid, what) in EVENT_CHECKS.items():
                if not valid(e[key]):
                    raise ValueError(
                        f"invalid ledger event: {key} must be {what}, got {e[key]!r:.40} "
                        f"(event {e!r:.200})"
                    )
            events.append(dict(e))
        declined = []
        for d in state["declined"]:
            if not isinstance(d, dict) or set(d) != DECLINED_KEYS:
                raise ValueError(f"malformed declined round in the ledger: {d!r:.200}")
            declined.append(dict(d))
        cached = None
        if "epsilon" in state:
            cached = state["epsilon"]
            if version < 5 and isinstance(cached, dict) and "alone" not in cached:
                cached = {**cached, "alone": 0.0}  # kept before the alone kind: no such event
            # ε may be inf (a noiseless round), never NaN or negative; JSON keeps inf as Infinity.
            if (
                not isinstance(cached, dict)
                or set(cached) != set(BUDGETS)
                or not all(type(v) in (int, float) and v >= 0 for v in cached.values())
            ):
                raise ValueError(f"malformed ledger epsilon {cached!r:.200}")
            cached = {k: float(v) for k, v in cached.items()}
        # Assigned only once everything is valid: a refused state leaves the ledger as it was.
        self.events = events
        self.declined = declined
        self._epsilon = cached

    def save(self, store: LocalStore) -> None:
        """Write the ledger into the device's encrypted store (one transaction)."""
        store.put_json(LEDGER_BLOB, self.state_dict())

    @classmethod
    def load(cls, store: LocalStore, policy: PrivacyCaps) -> PrivacyLedger:
        """Load the ledger from ``store`` (a fresh one if the store has none yet).

        Raises:
            ValueError: If the stored ledger is corrupted or does not match ``policy``.
        """
        ledger = cls(policy)
        try:
            state = store.get_json(LEDGER_BLOB)
        except StoreCorrupted as err:
            raise ValueError(f"corrupted privacy ledger: {err}; restore the store") from err
        if state is not None:
            ledger.load_state_dict(state)
        return ledger
