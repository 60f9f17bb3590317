"""What a device holds, read from its store alone: settings, state, evidence, privacy spend.

``fedpersona device status`` and ``budget`` answer from here without loading torch or a model
(the ledger keeps its ε computed at save time); the assistant's own ``status()`` and
``budget()`` are the same functions, so the two never disagree.
"""

from __future__ import annotations

from typing import Any

from client.assistant.evidence import DriftDetector, Gate, choose_variant
from client.assistant.profile import Profile
from client.federation.ledger import PrivacyLedger
from client.federation.policy import DevicePolicy
from client.store import LocalStore
from client.store.examples import device_examples, split
from client.store.state import (
    DRIFT_BLOB,
    EXPERTS_BLOB,
    GATE_BLOB,
    LOCAL_USER,
    META_BLOB,
    SETTINGS_BLOB,
    DeviceState,
    lora_fingerprint,
    paused_since,
)
from common.config import RunConfig, parse_run_config


def load_settings(store: LocalStore) -> RunConfig:
    """The run-config subset the device keeps (model, LoRA, strategy, privacy caps).

    Raises:
        ValueError: If the store was never set up, or its settings are invalid.
    """
    settings = store.get_json(SETTINGS_BLOB)
    if settings is None:
        raise ValueError(f"device store {store.root} has no settings; run `fedpersona device init`")
    return parse_run_config(settings)


def open_state(store: LocalStore, cfg: RunConfig) -> DeviceState:
    """The device's state record under ``cfg`` (refused if it was kept under other settings).

    Raises:
        ValueError: On a corrupted record or one written under another model or LoRA.
    """
    meta = store.get_json(META_BLOB)
    user = meta.get("user") if isinstance(meta, dict) else None
    return DeviceState(
        store,
        user=user if isinstance(user, str) else LOCAL_USER,
        strategy=cfg.strategy,
        model=cfg.model.name,
        lora=lora_fingerprint(cfg.model),
    )


def load_evidence(store: LocalStore, state: DeviceState) -> tuple[Gate, DriftDetector]:
    """The cold-start gate (with the federation's last held-out losses) and drift detector.

    Raises:
        ValueError: On malformed stored evidence.
    """
    gate, drift = Gate(), DriftDetector()
    for blob, obj in ((GATE_BLOB, gate), (DRIFT_BLOB, drift)):
        saved = store.get_json(blob)
        if saved is not None:
            obj.load_state_dict(saved)
    m = state.meta
    if m.personal_loss is not None and m.global_loss is not None:
        gate.federated = (m.personal_loss, m.global_loss)
    return gate, drift


def budget(store: LocalStore) -> dict[str, Any]:
    """The device's privacy ledger: ε spent per kind, caps, what the numbers assume.

    Raises:
        ValueError: If the stored ledger is corrupted or kept under another accountant or δ.
    """
    p = DevicePolicy.of(store)
    ledger = PrivacyLedger.load(store, p.caps)
    s = ledger.summary()
    return {
        "record_epsilon": s["record_epsilon"],
        "user_epsilon": s["user_epsilon"],
        "alone_epsilon": s["alone_epsilon"],
        "epsilon_cap": p.epsilon_cap,
        "worst_case_epsilon_cap": p.worst_case_epsilon_cap,
        "delta": p.delta,
        "accountant": p.accountant,
        "rounds_charged": int(s["rounds_charged"]),
        "rounds_declined": len(ledger.declined),
        "policy": {k: v for k, v in p.to_dict().items() if k != "version"},
        "assumes": (
            "user-level ε, add/remove-one-user neighbours: Gaussian noise on the clipped "
            "update of each round this device joined, sampling rate "
            + (
                "q where the device drew its own coin or trusts the server's sampling"
                if p.trust_server_sampling
                else "q only where the device drew its own coin, else 1 (no amplification)"
            )
            + "; the server sees only the SecAgg+ sum if secure aggregation is on, and "
            f"at least {p.honest_fraction:g} of every cohort this device joins is honest (not "
            "the server's own devices: this device declines rounds that assume more). Alone "
            "ε (the worst case): the same updates with only this device's own noise share, "
            "as if every other device of its cohorts were the server's"
            + (
                f" (capped at {p.worst_case_epsilon_cap:g})"
                if p.worst_case_epsilon_cap > 0
                else " (reported, not capped)"
            )
            + ". Record-level ε: the device's own DP-SGD. On-device feedback adaptation "
            "changes only personal parameters, which never leave the device."
        ),
    }


def status(store: LocalStore) -> dict[str, Any]:
    """Profile summary, history, adapter, answering model, privacy and retention in one dict.

    Raises:
        ValueError: If the store was never set up or a record in it is corrupted.
    """
    cfg = load_settings(store)
    state = open_state(store, cfg)
    gate, drift = load_evidence(store, state)
    experts = list(store.get_json(EXPERTS_BLOB) or {})
    examples = device_examples(store)
    train, held_out = split(examples, cfg.data.test_fraction)
    m = state.meta
    blobs = store.blob_sizes()
    return {
        "data_dir": str(store.root),
        "model": cfg.model.name,
        "strategy": cfg.strategy,
        "profile": Profile.from_dict(store.get_profile() or {}).describe(),
        "interactions": store.count_interactions(),
        "feedback": len(store.feedback()),
        "examples": {
            "by_source": store.example_counts(),
            "endorsed_interactions": sum(e.source == "endorsed" for e in examples),
            "train": len(train),
            "held_out": len(held_out),
            "min_to_join": cfg.data.min_examples,
        },
        "personal_adapter": {
            "present": "personal" in blobs,
            "bytes": blobs.get("personal", 0),
            "rounds_trained": m.rounds_trained,
            "last_round": m.last_round,
        },
        "active_model": choose_variant(gate, has_experts=bool(experts)),
        "gate": gate.reason(),
        "drift_events": len(drift.events),
        "experts": experts,
        "budget": budget(store),
        "retention_days": store.retention_days,
        "last_purge": float(store.get_meta("last_purge", "0") or 0),
        "store_bytes": store.size_bytes(),
        "federation": federation(store),
    }


def federation(store: LocalStore) -> dict[str, Any]:
    """This device in its federation: the service ``device join`` runs (the address, whether
    it runs now), the pause switch, rounds joined and declined (with reasons), ε against the
    cap, the last round's time and what left the device in its last rounds (names, shapes,
    bytes; never values).

    Raises:
        ValueError: If the stored ledger or device record is corrupted.
    """
    from client.federation.join import read_state

    state = open_state(store, load_settings(store))  # fresh: the worker writes it
    service = read_state(store.root)
    p = DevicePolicy.of(store)
    ledger = PrivacyLedger.load(store, p.caps)
    s = ledger.summary()
    declined = [
        {
            "run": str(d.get("run", "")),
            "round": d["round"],
            "time": d["time"],
            "reason": d["reason"],
        }
        for d in ledger.declined
    ]
    sent = [
        {k: h.get(k) for k in ("run", "round", "time", "sent")}
        for h in state.meta.history
        if isinstance(h.get("sent"), dict)
    ]
    times = [e["time"] for e in ledger.events] + [d["time"] for d in declined]
    return {
        "joined": service is not None,
        "address": None if service is None else service.get("address"),
        "running": bool(service and service.get("running")),
        # Whether the server answered the service's last check (None: not checked here).
        "connected": None if service is None else service.get("connected"),
        "server_error": None if service is None else service.get("server_error"),
        "processes": {} if service is None else service.get("processes", {}),
        # How `join` runs the server's ClientApp code here (client/federation/sandbox.py).
        "isolation": None if service is None else service.get("isolation"),
        "paused_since": paused_since(store),
        "rounds_joined": int(s["rounds_charged"]),
        "rounds_declined": len(declined),
        "declined": declined[-10:],
        "user_epsilon": s["user_epsilon"],
        "epsilon_cap": p.epsilon_cap,
        "last_round_time": max(times, default=None),
        "sent": sent[-10:],
        "alone_epsilon": s["alone_epsilon"],
        "leaves": what_leaves(p)["leaves"],
    }


# What never leaves a device, whatever a server asks (docs/deploy.md, "What leaves a device").
NEVER_LEAVES = (
    "your conversations, requests and answers",
    "your ratings, preferred answers and edits",
    "your imported writing and every training example",
    "your profile, embeddings and context",
    "the personal adapter (it trains here and stays here)",
    "the store's key, passphrase and API token",
)


def what_leaves(policy: DevicePolicy) -> dict[str, list[str]]:
    """What may leave this device under its owner's ``policy`` (``leaves``), and what never
    does (``never_leaves``), in words for the privacy page and ``device status``."""
    leaves = [
        "in each round it joins: the update of the shared adapter, clipped to norm C with its "
        "share of the noise, masked by SecAgg+ (the server sees only the cohort's sum)"
        + ("" if policy.require_secagg else ", or unmasked where the round has no SecAgg+"),
        "beside it, allow-listed numbers: whether it declined, how many examples it trained "
        "on, its training loss and the ε it has spent",
        "if a round asks for them (eval.secure-sums): its held-out losses of the model the "
        "round started from, only inside the SecAgg+ sum",
    ]
    never = list(NEVER_LEAVES)
    if policy.share_losses:
        leaves.append(
            "after a round it trained in: its held-out losses of that round's release, "
            "once per round (share-losses is on)"
        )
    else:
        never.append("your held-out losses, one by one (share-losses is off)")
    if policy.share_ab_counts:
        leaves.append(
            "how many of your ratings each model got and their sums (the A/B test), only "
            "inside the SecAgg+ sum (share-ab-counts is on)"
        )
    else:
        never[1] = "your ratings, preferred answers and edits, and any count of them"
    return {"leaves": leaves, "never_leaves": never}


def privacy(store: LocalStore, *, shared_numbers: int | None = None) -> dict[str, Any]:
    """The privacy page: the ledger, every round the device joined or declined and what it
    sent, what never leaves, retention and what the store holds.

    Args:
        store: The open device store.
        shared_numbers: How many numbers the shared adapter holds (what one update carries),
            when the caller knows the model.

    Raises:
        ValueError: If the stored ledger is corrupted or kept under another accountant or δ.
    """
    p = DevicePolicy.of(store)
    ledger = PrivacyLedger.load(store, p.caps)
    joined: dict[tuple[str, int], dict[str, Any]] = {}
    for e in ledger.events:
        row = joined.setdefault(
            (e["run"], e["round"]),
            {"run": e["run"], "round": e["round"], "time": e["time"], "joined": True},
        )
        row[f"{e['kind']}_noise_multiplier"] = e["noise_multiplier"]
        row[f"{e['kind']}_sample_rate"] = e["sample_rate"]
        row[f"{e['kind']}_steps"] = e["steps"]
    size = f" ({shared_numbers:,} numbers)" if shared_numbers else ""
    rounds = []
    for row in joined.values():
        sigma = row.get("user_noise_multiplier")
        # The user-level charge is what the federation's guarantee is about: its numbers
        # lead (``None`` for a device that only kept a record-level charge).
        row["noise_multiplier"] = sigma
        row["sample_rate"] = row.get("user_sample_rate")
        row["steps"] = row.get("user_steps")
        noise = f"Gaussian noise σ = {sigma:g}·C" if sigma else "no user-level noise"
        rounds.append(
            {
                **row,
                "reason": None,
                "sent": f"the update of the shared adapter{size}, clipped to norm C, with "
                f"{noise}; and allow-listed numbers (example count, training loss, ε spent)",
            }
        )
    for d in ledger.declined:
        rounds.append(
            {
                "run": str(d.get("run", "")),
                "round": d["round"],
                "time": d["time"],
                "joined": False,
                "reason": d["reason"],
                "sent": (
                    "its noise share alone, masked (it had joined the SecAgg+ cohort): no "
                    "update, nothing charged"
                    if "noise share alone" in d["reason"]
                    else "a decline: no update, nothing charged"
                ),
                "noise_multiplier": None,
                "sample_rate": None,
                "steps": None,
            }
        )
    rounds.sort(key=lambda r: r["time"], reverse=True)
    return {
        "federation": federation(store),
        "budget": budget(store),
        "rounds": rounds,
        **what_leaves(p),
        "retention_days": store.retention_days,
        "last_purge": float(store.get_meta("last_purge", "0") or 0),
        "stored": {
            "interactions": store.count_interactions(),
            "feedback": len(store.feedback()),
            "examples": sum(store.example_counts().values()),
            "store_bytes": store.size_bytes(),
        },
    }
