"""The device's side of a SecAgg+ stage: Flower's ``secaggplus_mod`` behind the device's own
checks (:mod:`client.federation.gate`). Flower only at import; the gate (and torch, for the
setup's ledger check) loads when a stage is checked. Run by the ClientApp without a worker,
and by the device worker with one.

Whether a training reply will leave masked is decided here, from what this process does, never
from what a message holds: :func:`masking` is true only while this process runs Flower's
masked-vector stage for a training message the gate admitted — the one place where the reply
is masked before it leaves. A plain ``train`` message carrying SecAgg+'s config record, or a
SecAgg+ record in a message of another type, is not masked: the first is judged as unmasked by
the device's policy, the second is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)

from client.federation.errors import DeviceError, error_code

logger = logging.getLogger(__name__)

# True only inside this process's run of the masked-vector stage (see the module docstring).
_MASKING: ContextVar[bool] = ContextVar("fedpersona_secagg_masking", default=False)


def masking() -> bool:
    """Whether the training reply computed now will leave SecAgg+-masked: only while this
    process runs the masked-vector stage of a SecAgg+ round through :func:`checked_secaggplus`
    (Flower's mod masks what the training callback returns before anything leaves)."""
    return _MASKING.get()


# The code the server gets when a device refuses at a stage (the reason stays in its log).
_REFUSAL_CODES = {
    Stage.SETUP: "declined",
    Stage.COLLECT_MASKED_VECTORS: "cohort-too-small",
    Stage.UNMASK: "unmask-refused",
}


def checked_secaggplus(msg: Message, ctxt: Context, call_next):  # type: ignore[no-untyped-def]
    """Flower's ``secaggplus_mod`` behind the device's own checks.

    A real device that will not contribute leaves the round at setup, or when the SecAgg+
    parameters would let its noise be clipped away or its masks be recovered
    (:func:`client.federation.gate.setup_refusal`); before it masks its update it checks the cohort
    it would be summed with (:func:`client.federation.gate.cohort_refusal`), and before it hands out
    mask shares, the cohort the server would unmask
    (:func:`client.federation.gate.unmask_refusal`). The server gets a code, never the device's
    text.
    """
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    if msg.metadata.message_type != MessageType.TRAIN:
        # Flower's mod would hand such a message to the training callback unmasked.
        logger.error(
            "refused a %s message carrying a SecAgg+ stage: SecAgg+ runs in training messages",
            msg.metadata.message_type,
        )
        raise DeviceError("rejected-message")
    stage = configs.get(Key.STAGE)
    if stage in _REFUSAL_CODES:
        try:
            refused = _refusal(str(stage), msg, ctxt, configs)
        except Exception as err:
            logger.error("the SecAgg+ check failed on this device: %s: %s", type(err).__name__, err)
            raise DeviceError(error_code(err)) from None
        if refused:
            raise DeviceError(_REFUSAL_CODES[str(stage)])
    token = _MASKING.set(stage == Stage.COLLECT_MASKED_VECTORS)
    try:
        return secaggplus_mod(msg, ctxt, call_next)
    except DeviceError:
        raise
    except Exception as err:  # Flower's protocol checks: their text stays here too
        logger.error("SecAgg+ stage %s failed: %s: %s", stage, type(err).__name__, err)
        raise DeviceError(error_code(err)) from None
    finally:
        _MASKING.reset(token)


def _refusal(stage: str, msg: Message, ctxt: Context, configs) -> str | None:  # type: ignore[no-untyped-def]
    """The gate's answer for ``stage`` (torch loads only for the setup's ledger check)."""
    from client.federation import gate
    from common.config import parse_run_config

    cfg = parse_run_config(dict(ctxt.run_config))
    if stage == Stage.SETUP:
        return gate.setup_refusal(cfg, ctxt.node_config, run=str(ctxt.run_id), secagg=configs)
    server_round = _server_round(msg)
    if stage == Stage.UNMASK:
        return gate.unmask_refusal(cfg, ctxt.node_config, configs, server_round=server_round)
    sources = configs.get(Key.SOURCE_LIST)
    if not isinstance(sources, list):
        raise ValueError("the masked-vector stage names no sources")
    return gate.cohort_refusal(
        cfg, ctxt.node_config, sources=distinct_sources(sources, ctxt), server_round=server_round
    )


def distinct_sources(sources: list[Any], ctxt: Context) -> int:
    """How many distinct other devices a masked-vector stage's source list names among this
    device's neighbours of the round's key sharing (a source named twice, or one it shared no
    key with, adds nobody's noise to the sum)."""
    neighbours, me = _neighbours(ctxt.state.config_records.get(RECORD_KEY_STATE))
    return len({s for s in sources if s in neighbours and s != me})


def _neighbours(state: Mapping[str, Any] | None) -> tuple[set[Any], Any]:
    """The node ids this device shared keys with in its SecAgg+ state, and its own id."""
    if state is None:
        return set(), None
    return set(state.get("public_keys_dict:K") or []), state.get("nid")


def _server_round(msg: Message) -> int | None:
    """The round a SecAgg+ stage belongs to: the fit config's, else the message group's."""
    fit_config = msg.content.config_records.get("fitins.config")
    value = fit_config.get("server-round") if fit_config is not None else msg.metadata.group_id
    try:
        return int(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None
