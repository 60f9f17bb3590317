"""The device's checks of a SecAgg+ round before it joins the cohort and before it masks.

**At setup** a real device decides whether it will contribute (its owner's pause, its
privacy policy, its training examples, its ledger — :func:`setup_refusal`); if not, it leaves
the round there, before any key is shared. A device that stayed in and then sent a zero update
would stay in everyone's cohort while adding no noise: with 7 of 8 declining, the server would
unmask the lone contributor's update with an eighth of the promised noise — so a device that
declines later than setup sends its noise share alone (``client/federation/device.py``).

Each device adds N(0, (σC)²/m_min) to its update, so the released sum carries the promised
(σC)² of noise only if at least m_min devices mask a vector into it. When the masked vectors
are collected, a device learns who completed key sharing with it (SecAgg+'s source list):
with fewer than m_min — or than its owner's ``min-cohort`` — it refuses to send its vector, so
a server that lost devices (or claimed more than it had) cannot unmask an under-noised sum.

Two more checks close what the server could otherwise bend. **At setup** the SecAgg+ parameters
it sends are checked (:func:`secagg_setup_problem`): a clipping range too narrow for the
device's noise share would clip the noise away, a reconstruction threshold of half the
neighbours or less lets a server that lies about dropouts recover one device's masks, and a
neighbour graph smaller than the cohort the device requires leaves it unable to count the
cohort. **At unmasking** (:func:`unmask_problem`) a device hands out mask shares only for a
cohort it accepts: at least m_min (and ``min-cohort``) of its neighbours sent a masked vector,
and no node is called both alive and dead — so a server that lost contributors after masking
cannot unmask an under-noised sum either.

This module imports no torch: it runs in the thin ClientApp process.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.federation.ledger import PrivacyLedger
from client.federation.policy import DevicePolicy
from client.store import DEFAULT_RETENTION_DAYS, LocalStore
from common.config import RunConfig
from common.crypto import resolve_secret
from common.dp.privatize import NOISE_TAIL_SIGMAS, Privatize

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
    if not cfg.dp.distributed:
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


def required_cohort(cfg: RunConfig, policy: DevicePolicy, num_partitions: int) -> int:
    """The fewest devices this device lets its masked update be summed with: its owner's
    ``min-cohort``, and m_min when it adds a share of distributed noise (sized for m_min)."""
    return max(policy.min_cohort, cfg.m_min(num_partitions) if cfg.dp.distributed else 1)


def secagg_setup_problem(
    cfg: RunConfig, configs: Mapping[str, Any], *, required: int, num_partitions: int
) -> str | None:
    """What is wrong with the SecAgg+ parameters a server sent at setup (``None``: nothing).

    Args:
        cfg: The run config (the device's clip norm and noise share follow from it).
        configs: The setup stage's config record (Flower's ``secaggplus_constants.Key``).
        required: :func:`required_cohort`.
        num_partitions: The federation size the device sizes its noise share by.
    """
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    try:
        sample = int(configs[Key.SAMPLE_NUMBER])
        shares = int(configs[Key.SHARE_NUMBER])
        threshold = int(configs[Key.THRESHOLD])
        clipping = float(configs[Key.CLIPPING_RANGE])
        target = int(configs[Key.TARGET_RANGE])
        modulus = int(configs[Key.MOD_RANGE])
        max_weight = float(configs[Key.MAX_WEIGHT])
    except (KeyError, TypeError, ValueError) as err:
        return f"the SecAgg+ setup is incomplete or malformed ({type(err).__name__}: {err})"
    neighbours = min(shares, sample)  # itself included (Flower's neighbour ring)
    if sample < required or neighbours < required:
        return (
            f"the round's SecAgg+ cohort ({sample} devices, {neighbours} neighbours of this one) "
            f"is smaller than the {required} this device masks its update into (m_min and its "
            "policy's min-cohort); it could not check that the sum carries the promised noise"
        )
    if not 2 * threshold > neighbours or threshold > neighbours:
        return (
            f"a reconstruction threshold of {threshold} of {neighbours} shares lets a server "
            "that calls a device both alive and dead to different neighbours recover both of "
            "its masks; this device requires a threshold above half its neighbours"
        )
    privatize = Privatize.of(cfg, num_partitions)  # what this device's update will be
    needed = privatize.clipping_range
    if privatize.discrete and (
        clipping != needed or target != privatize.quantization_range or modulus != 2**32
    ):
        return (
            f"the SecAgg+ range (clipping {clipping:g}, {target} levels, modulus {modulus}) "
            f"is not the identity on this device's {privatize.bits}-bit integers: skellam "
            f"mode needs clipping {needed:g}, {privatize.quantization_range} levels and "
            "modulus 2^32, derived from the run config"
        )
    if not clipping >= needed * (1 - 1e-9):
        return (
            f"the SecAgg+ clipping range {clipping:g} would cut this device's update (entries up "
            f"to C = {privatize.clip_norm:g}) and its noise share; it needs at least {needed:.6g} "
            f"(C + {NOISE_TAIL_SIGMAS:g} standard deviations of the share)"
        )
    if max_weight != 1.0:
        return f"max_weight {max_weight:g}: a device sends weight 1, so the range must be 1"
    if not (target > 0 and (sample + 1) * target <= modulus <= 2**32):
        return (
            f"{sample} quantized updates in [0, {target}] plus their weights can wrap the "
            f"modulus {modulus}; the released sum would be wrong"
        )
    return None


def unmask_problem(configs: Mapping[str, Any], *, required: int) -> str | None:
    """Why this device will not hand out mask shares at SecAgg+'s unmasking stage.

    Its active neighbours (itself included) are those whose masked vectors the server says it
    holds: fewer than ``required`` would let it unmask a sum with less noise than promised. A
    node both active and dead would let it remove both masks of that node's vector.
    """
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    active = list(configs.get(Key.ACTIVE_NODE_ID_LIST) or [])
    dead = list(configs.get(Key.DEAD_NODE_ID_LIST) or [])
    if set(active) & set(dead) or len(set(active)) != len(active):
        return "the unmasking request names a node both active and dead (or twice)"
    if len(active) < required:
        return (
            f"only {len(active)} of this device's neighbours sent a masked vector; it helps "
            f"unmask only a sum of at least {required} (m_min and its policy's min-cohort)"
        )
    return None


def _keep_declined(
    store: LocalStore,
    policy: DevicePolicy,
    *,
    server_round: int,
    reason: str,
    ledger: PrivacyLedger | None = None,
) -> None:
    """Keep a declined round and its reason in the device's ledger (nothing charged)."""
    if ledger is None:
        ledger = PrivacyLedger.load(store, policy.caps)
    ledger.note_declined(server_round=server_round, reason=reason)
    ledger.save(store)


def setup_refusal(
    cfg: RunConfig,
    node_config: Mapping[str, Any],
    *,
    run: str,
    secagg: Mapping[str, Any] | None = None,
) -> str | None:
    """Why a real device will not contribute to this round (``None``: it joins the cohort).
    The refusal is kept in its ledger's declined rounds; nothing is charged.

    ``secagg``: the setup stage's config record, checked by :func:`secagg_setup_problem`.

    The ledger check assumes the round costs one step (the round number is not known at
    setup); the check before training is the exact one. A simulated node (no ``data-dir``)
    decides when it trains.
    """
    if "data-dir" not in node_config:
        return None
    from client.federation.ledger import BudgetExhausted
    from client.store.examples import device_examples, split, too_few_examples
    from client.store.state import paused_since

    n = node_federation_size(cfg, node_config)
    with open_real_store(node_config) as store:
        policy = DevicePolicy.of(store)
        ledger = PrivacyLedger.load(store, policy.caps)
        reason = None
        if paused_since(store) is not None:
            reason = "paused by the device's owner (`fedpersona device federation resume`)"
        if reason is None:
            reason = policy.refusal(cfg, num_partitions=n, masked=True)
        if reason is None and secagg is not None:
            reason = secagg_setup_problem(
                cfg, secagg, required=required_cohort(cfg, policy, n), num_partitions=n
            )
        if reason is None:
            train, _ = split(device_examples(store), cfg.data.test_fraction)
            reason = too_few_examples(len(train), cfg.data.min_examples)
        if reason is None:
            charges = policy.planned_charges(
                cfg,
                ledger,
                num_train=len(train),
                server_round=ledger.last_round(run) + 1,
                num_partitions=n,
                run=run,
                rounding=_rounding(cfg, n),
            )
            try:
                ledger.check(**charges._asdict())
            except BudgetExhausted as err:
                reason = str(err)
        if reason is None:
            return None
        _keep_declined(
            store, policy, server_round=0, reason=f"at SecAgg+ setup: {reason}", ledger=ledger
        )
    logger.warning("device leaves this round at SecAgg+ setup: %s", reason)
    return reason


def _rounding(cfg: RunConfig, num_partitions: int) -> tuple[float, float, float] | None:
    """``skellam`` mode: the rounding a round's charge carries (``None`` otherwise)."""
    privatize = Privatize.of(cfg, num_partitions)
    if not privatize.discrete:
        return None
    from client.federation.runtime import shared_dim

    return privatize.discrete_params(shared_dim(cfg)).charge


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
    with open_real_store(node_config) as store:
        policy = DevicePolicy.of(store)
        required = required_cohort(cfg, policy, n)
        cohort = sources + 1
        if cohort >= required:
            return None
        reason = (
            f"only {cohort} devices completed SecAgg+ key sharing with this one; it masks its "
            f"update only into a cohort of at least {required} (m_min and its policy's "
            "min-cohort), so the sum could carry less noise than promised"
        )
        _keep_declined(store, policy, server_round=server_round or 0, reason=reason)
    logger.warning("device declines to mask its update: %s", reason)
    return reason


def unmask_refusal(
    cfg: RunConfig,
    node_config: Mapping[str, Any],
    configs: Mapping[str, Any],
    *,
    server_round: int | None = None,
) -> str | None:
    """Why a real device will not hand out its mask shares (:func:`unmask_problem`), kept in
    its ledger's declined rounds; ``None``: it answers. A simulated node does not check."""
    if "data-dir" not in node_config:
        return None
    n = node_federation_size(cfg, node_config)
    with open_real_store(node_config) as store:
        policy = DevicePolicy.of(store)
        reason = unmask_problem(configs, required=required_cohort(cfg, policy, n))
        if reason is None:
            return None
        _keep_declined(
            store, policy, server_round=server_round or 0, reason=f"at unmasking: {reason}"
        )
    logger.warning("device refuses to help unmask: %s", reason)
    return reason
