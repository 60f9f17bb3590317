"""The device's side of a SecAgg+ stage: Flower's ``secaggplus_mod`` behind the device's own
checks (:mod:`client.federation.gate`). Flower only at import; the gate (and torch, for the
setup's ledger check) loads when a stage is checked. Run by the ClientApp without a worker,
and by the device worker with one."""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.federation.errors import DeviceError, error_code

logger = logging.getLogger(__name__)


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
    stage = configs.get(Key.STAGE) if msg.metadata.message_type == MessageType.TRAIN else None
    if stage in _REFUSAL_CODES:
        try:
            refused = _refusal(str(stage), msg, ctxt, configs)
        except Exception as err:
            logger.error("the SecAgg+ check failed on this device: %s: %s", type(err).__name__, err)
            raise DeviceError(error_code(err)) from None
        if refused:
            raise DeviceError(_REFUSAL_CODES[str(stage)])
    try:
        return secaggplus_mod(msg, ctxt, call_next)
    except DeviceError:
        raise
    except Exception as err:  # Flower's protocol checks: their text stays here too
        logger.error("SecAgg+ stage %s failed: %s: %s", stage, type(err).__name__, err)
        raise DeviceError(error_code(err)) from None


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
        cfg, ctxt.node_config, sources=len(sources), server_round=server_round
    )


def _server_round(msg: Message) -> int | None:
    """The round a SecAgg+ stage belongs to: the fit config's, else the message group's."""
    fit_config = msg.content.config_records.get("fitins.config")
    value = fit_config.get("server-round") if fit_config is not None else msg.metadata.group_id
    try:
        return int(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None
