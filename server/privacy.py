"""What a run's printed ε means: the privacy section of ``summary.json``.

The federation accountant (:mod:`server.accountant`) gives the numbers; this module says what
they assume — the neighbouring relation, whom the guarantee trusts, the sampling the
amplification credits, δ and the part SecAgg+'s quantization adds to it — and what no ε
covers.
"""

from __future__ import annotations

import math
from typing import Any

from common.config import RunConfig
from common.dp.discrete import DiscreteParams
from common.dp.privatize import NOISE_TAIL_SIGMAS, Privatize


def secagg_clip_probability(*, updates: int, num_params: int) -> float:
    """Union bound on the chance that SecAgg+ clips any coordinate of any of ``updates``
    noised updates of ``num_params`` entries in one round.

    An entry of a clipped update lies in [-C, C]; SecAgg+ quantizes within C + 7·std of noise
    (:data:`common.dp.privatize.NOISE_TAIL_SIGMAS`), so an entry is clipped only where its noise
    passes 7 standard deviations (probability erfc(7/√2) ≈ 2.6e-12). A clipped entry changes
    the released sum's distribution, so this probability belongs in δ.
    """
    return min(1.0, updates * num_params * math.erfc(NOISE_TAIL_SIGMAS / math.sqrt(2)))


def privacy_report(  # type: ignore[no-untyped-def]
    cfg: RunConfig,
    *,
    m_min: int,
    sample_rate: float,
    acc,
    num_params: int = 0,
    round_updates: tuple[int, ...] = (),
    discrete: DiscreteParams | None = None,
    privatize: Privatize | None = None,
) -> dict:
    """What the printed ε means and what it assumes.

    ``num_params`` (entries of the shared update) and ``round_updates`` (updates in each
    released round) size the effective δ under SecAgg+ clipping
    (:func:`secagg_clip_probability`). ``discrete``: ``skellam`` mode's derived parameters.
    ``privatize``: the devices' privatize step (distributed noise: what each device's update
    alone carries, :func:`worst_case`).
    """
    dp = cfg.dp
    if not dp.adds_noise:
        user: dict[str, Any] = {
            "mode": dp.noise_mode,
            "epsilon": float("inf"),
            "note": "no user-level DP: updates are not noised",
        }
    else:
        user = {
            "mode": dp.noise_mode,
            "noise_multiplier": dp.noise_multiplier,
            "clip_norm": dp.clip_norm,
            "min_updates": m_min,
            "sample_rate": sample_rate,
            "rounds_released": len(acc.history),
            "delta": cfg.privacy.delta,
            "epsilon_rdp": acc.epsilon("rdp"),
            "epsilon_prv": acc.epsilon("prv"),
            "sampling": cfg.sampling,
            "assumes": _assumes(cfg, m_min, sample_rate),
            **_guarantee(cfg, num_params, round_updates),
        }
        if discrete is not None:
            user.update(_skellam(discrete))
        if dp.distributed and privatize is not None:
            user["worst_case"] = worst_case(cfg, privatize, m_min=m_min, discrete=discrete)
    return {
        "user_level": user,
        "record_level": {
            "enabled": dp.local_enabled,
            "noise_multiplier": dp.local_noise_multiplier if dp.local_enabled else 0.0,
            "max_grad_norm": dp.local_max_grad_norm,
            "note": "per device, from its own Opacus accountant: see clients[].record_epsilon",
        },
        "secure_aggregation": "SecAgg+" if cfg.secagg.enabled else "off",
        "not_covered": "the scalar metrics devices report in the clear (train and held-out "
        "losses, counts) are not part of any ε above",
        "device_epsilon_cap": cfg.privacy.epsilon_cap,
    }


def worst_case(
    cfg: RunConfig, privatize: Privatize, *, m_min: int, discrete: DiscreteParams | None = None
) -> dict[str, Any]:
    """What the user-level ε assumes about honesty, and what one update is worth without it:
    each device's noise share, the honest devices it is sized for, and the ε of one round's
    update with its own share as the only noise (every other device of its cohort the
    server's) — the ``alone`` charge of every device's ledger."""
    from common.dp.accounting import epsilon

    sigma = privatize.alone_noise_multiplier
    entry: tuple = (sigma, 1.0, 1) if discrete is None else (sigma, 1.0, 1, discrete.charge)
    return {
        "honest_fraction": cfg.dp.honest_fraction,
        "honest_devices": max(1, math.floor(cfg.dp.honest_fraction * m_min + 1e-9)),
        "share_floor": cfg.dp.share_floor,
        "noise_share_std": privatize.noise_std,
        "alone_noise_multiplier": sigma,
        "alone_epsilon_per_round": epsilon([entry], delta=cfg.privacy.delta),
        "note": "each device's noise share is sized so that the honest "
        "⌊honest_fraction·m_min⌋ of a cohort add N(0, (σC)²) between them; a server whose own "
        "devices fill more of a cohort than 1 − honest_fraction removes their noise and "
        "learns more than the user-level ε. alone_epsilon_per_round is the worst case: one "
        "round's update with only the device's own share (q = 1), as every ledger also "
        "charges it (its `alone` budget; docs/privacy.md, Threat model)",
    }


def _skellam(params: DiscreteParams) -> dict[str, Any]:
    """``skellam`` mode: which guarantee holds, and the derived encoding it holds for."""
    return {
        "guarantee": "exact for what the server unmasks: the sum of the devices' rotated, "
        "scaled, stochastically rounded updates plus their Skellam shares, analysed together "
        "(Agarwal, Kairouz, Liu 2021, RDP with the rounding's inflated sensitivities; "
        "Poisson subsampling by Zhu & Wang's general bound); the modulo-2^b reduction is "
        "post-processing",
        "epsilon_prv_note": "no PRV analysis of the Skellam mechanism here: epsilon_prv is the "
        "RDP ε",
        "discrete": {
            "rotation_length": params.d,
            "bits": params.bits,
            "scale": params.scale,
            "l2_sensitivity_over_clip": params.l2_sensitivity / params.clip_norm,
            "max_contributions": params.max_contributions,
            "wrap_probability_per_round": params.wrap_probability,
            "wrap_note": "a wrap-around corrupts that round's mean (utility), never the "
            "guarantee: the bound is printed for each run",
        },
    }


def _assumes(cfg: RunConfig, m_min: int, sample_rate: float) -> str:
    """Whom the user-level ε trusts and which sampling its amplification assumes."""
    share = (
        "its share of Skellam noise as integers inside SecAgg+"
        if cfg.dp.discrete
        else "N(0, (σC)²/⌊h·m_min⌋) before SecAgg+"
    )
    h = cfg.dp.honest_fraction
    honest = max(1, math.floor(h * m_min + 1e-9))
    trust = (
        f"at least {honest} (h={h:g} of m_min={m_min}) of each round's participants are "
        f"honest (each adds {share}); the server never sees a noise-free sum"
        if cfg.dp.distributed
        else "a trusted server (it adds the noise after unmasking the sum)"
    )
    sampling = (
        f"Poisson sampling by the server, each device with probability q={sample_rate:.3g}"
        " (the sampling the accountant's amplification assumes)"
        if cfg.sampling == "poisson"
        else f"a fixed-size uniform sample of q={sample_rate:.3g} of the devices, "
        "accounted as if Poisson (an approximation)"
    )
    return (
        f"{trust}; {sampling}; a device credits the sampling only where it drew its own "
        "participation coin or its owner trusts the server's claim (device privacy policy), "
        "else it charges each round it joins at q = 1"
    )


def _guarantee(cfg: RunConfig, num_params: int, round_updates: tuple[int, ...]) -> dict[str, Any]:
    """The neighbouring relation, the trust model and the effective δ of the user-level ε."""
    distributed = cfg.dp.distributed
    clipped = (
        sum(secagg_clip_probability(updates=u, num_params=num_params) for u in round_updates)
        if distributed and cfg.secagg.enabled and not cfg.dp.discrete
        else 0.0
    )
    return {
        "neighbouring": "add or remove one user's entire data (user-level); replacing "
        "one user's data with another's doubles the sensitivity (2C): its ε is that of "
        "σ/2",
        "trust": (
            "honest-but-curious server that runs SecAgg+ as published; no collusion of "
            "the server with as many of a round's devices as the SecAgg+ "
            "reconstruction threshold; at least ⌊dp.honest-fraction·m_min⌋ honest devices "
            "(not the server's own) in each released round, each adding its share of the "
            "noise"
            if distributed
            else "a trusted server that adds the noise to the unmasked sum; devices "
            "cannot verify it and decline unless their owner trusts server noise"
        ),
        "effective_delta": cfg.privacy.delta + clipped,
        "effective_delta_note": "δ plus the chance that SecAgg+ clipped any noised "
        "coordinate in a released round (union bound over devices and entries: "
        f"{clipped:.2g})"
        if clipped
        else "δ: no SecAgg+ quantization clips the noised updates"
        + (" (skellam: SecAgg+ carries the devices' integers exactly)" if cfg.dp.discrete else ""),
    }
