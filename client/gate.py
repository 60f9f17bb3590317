"""The device's checks of a SecAgg+ round before it joins the cohort and before it masks.

**At setup** a real device decides whether it will contribute (its privacy policy, its
training examples, its ledger — :func:`setup_refusal`); if not, it leaves the round there,
before any key is shared. A device that stayed in and then sent a zero update would stay in
everyone's cohort while adding no noise: with 7 of 8 declining, the server would unmask the
lone contributor's update with an eighth of the promised noise.

Each device adds N(0, (σC)²/m_min) to its update, so the released sum carries the promised
(σC)² of noise only if at least m_min devices mask a vector into it. When the masked vectors
are collected, a device learns who completed key sharing with it (SecAgg+'s source list):
with fewer than m_min — or than its owner's ``min-cohort`` — it refuses to send its vector, so
a server that lost devices (or claimed more than it had) cannot unmask an under-noised sum.

This module imports no torch: it runs in the thin ClientApp process.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.ledger import LedgerPolicy, PrivacyLedger
from client.policy import DevicePolicy
from client.store import DEFAULT_RETENTION_DAYS, LocalStore
from common.config import RunConfig
from common.crypto import resolve_secret

logger = logging.getLogger(__name__)


def federation_size(cfg: RunConfig) -> int:
    """The federation size a real device sizes its share of distributed noise by, when its node
    config has no ``num-partitions``: ``data.num-users``, else ``dp.min-clients`` (which then
    fixes m_min), else 1 where no distributed noise is added.

    Raises:
        ValueError: Distributed noise with neither key set: the share cannot be sized.
    """
    if cfg.data.num_users > 0:
        return cfg.data.num_users
    if cfg.dp.min_clients > 0:
        return cfg.dp.min_clients
    if cfg.dp.noise_mode != "distributed" or not cfg.dp.adds_noise:
        return 1
    raise ValueError(
        "the device cannot size its share of the noise: the run config sets neither "
        "data.num-users nor dp.min-clients, and the node config has no num-partitions"
    )


def node_federation_size(cfg: RunConfig, node_config: Mapping[str, Any]) -> int:
    """The node config's ``num-partitions``, else :func:`federation_size`."""
    partitions = node_config.get("num-partitions")
    return int(partitions) if partitions is not None else federation_size(cfg)


def open_real_store(node_config: Mapping[str, Any]) -> LocalStore:
    """The encrypted store a real device's node config names (``data-dir``, ``key-file``,
    else ``$FEDPERSONA_PASSPHRASE``; ``retention-days``)."""
    root = Path(str(node_config["data-dir"])).expanduser()
    key_file = node_config.get("key-file")
    secret = resolve_secret(key_file=None if key_file is None else str(key_file))
    retention = float(node_config.get("retention-days", DEFAULT_RETENTION_DAYS))
    return LocalStore.open(root, secret, retention_days=retention, create=True)


def setup_refusal(cfg: RunConfig, node_config: Mapping[str, Any], *, run: str) -> str | None:
    """Why a real device will not contribute to this round (``None``: it joins the cohort).
    The refusal is kept in its ledger's declined rounds; nothing is charged.

    The ledger check assumes the round costs one step (the round number is not known at
    setup); the check before training is the exact one. A simulated node (no ``data-dir``)
    decides when it trains.
    """
    if "data-dir" not in node_config:
        return None
    from client.examples import device_examples, split, too_few_examples
    from client.ledger import BudgetExhausted

    n = node_federation_size(cfg, node_config)
    with open_real_store(node_config) as store:
        policy = DevicePolicy.of(store)
        ledger = PrivacyLedger.load(store, LedgerPolicy.from_config(policy))
        reason = policy.refusal(cfg, num_partitions=n, masked=True)
        if reason is None:
            train, _ = split(device_examples(store), cfg.data.test_fraction)
            reason = too_few_examples(len(train), cfg.data.min_examples)
        if reason is None:
            record, user = policy.planned_charges(
                cfg, ledger, num_train=len(train), server_round=ledger.last_round(run) + 1, run=run
            )
            try:
                ledger.check(record=record, user=user)
            except BudgetExhausted as err:
                reason = str(err)
        if reason is None:
            return None
        ledger.note_declined(server_round=0, reason=f"at SecAgg+ setup: {reason}")
        ledger.save(store)
    logger.warning("device leaves this round at SecAgg+ setup: %s", reason)
    return reason


def cohort_refusal(
    cfg: RunConfig, node_config: Mapping[str, Any], *, sources: int, server_round: int | None
) -> str | None:
    """Why a real device refuses to mask its vector into a cohort of ``sources`` + 1 devices
    (``None``: it accepts). The refusal is kept in its ledger's declined rounds.

    A simulated node (no ``data-dir``) belongs to the simulation, whose config it follows.
    """
    if "data-dir" not in node_config:
        return None
    n = node_federation_size(cfg, node_config)
    distributed = cfg.dp.noise_mode == "distributed" and cfg.dp.adds_noise
    with open_real_store(node_config) as store:
        policy = DevicePolicy.of(store)
        required = max(policy.min_cohort, cfg.m_min(n) if distributed else 1)
        cohort = sources + 1
        if cohort >= required:
            return None
        reason = (
            f"only {cohort} devices completed SecAgg+ key sharing with this one; it masks its "
            f"update only into a cohort of at least {required} (m_min and its policy's "
            "min-cohort), so the sum could carry less noise than promised"
        )
        ledger = PrivacyLedger.load(store, LedgerPolicy.from_config(policy))
        ledger.note_declined(server_round=server_round or 0, reason=reason)
        ledger.save(store)
    logger.warning("device declines to mask its update: %s", reason)
    return reason
