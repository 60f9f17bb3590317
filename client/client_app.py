"""fedpersona ClientApp: thin Flower wiring around the device.

One app serves both server paths. Message-API messages carry ``arrays`` + ``config``; the
SecAgg+ path uses Flower's legacy records (``fitins.*`` / ``evaluateins.*``) and the SecAgg+
protocol stages, which :func:`secagg_when_requested` hands to Flower's ``secaggplus_mod``.

This module imports Flower only. Flower starts a fresh ClientApp process for every message,
from the app bundle the server sends with each run — so on a real device this process is the
server's code, not the device owner's. When the node config names the device's worker
(``worker-socket``, see :mod:`client.federation.worker`; its only key there), every training,
evaluation and SecAgg+ message goes to the worker: the project's installed code, which alone holds
the passphrase, the encrypted store, the SecAgg+ keys and the unmasked update, and enforces the
owner's privacy policy. This process relays; if the worker is down the message fails. Without
a worker (simulations, tests) :mod:`client.federation.handlers` and the SecAgg+ checks run here.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.federation import worker
from client.federation.worker import DeviceError, error_code


def secagg_when_requested(msg: Message, ctxt: Context, call_next):  # type: ignore[no-untyped-def]
    """Run the device's side of SecAgg+ for SecAgg+ messages; pass others straight through.

    When the node config names the device's worker (``worker-socket``), the whole protocol
    runs there (:func:`checked_secaggplus` in :mod:`client.federation.worker`): the worker holds the
    device's store, its SecAgg+ keys and its unmasked update, and this process — code the
    server ships in its app bundle — only relays what the worker answers (masked vectors,
    encrypted key shares). Without a worker it runs here.
    """
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    if ctxt.node_config.get(worker.SOCKET_KEY) and msg.metadata.message_type == MessageType.TRAIN:
        return Message(content=_forward(worker.SECAGG, msg, ctxt), reply_to=msg)
    return checked_secaggplus(msg, ctxt, call_next)


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


logger = logging.getLogger(__name__)
app = ClientApp(mods=[secagg_when_requested])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on the device's data; reply with the clipped (noised) shared update only."""
    return Message(content=_answer("train", msg.content, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate base, global and personal models on the device's held-out text."""
    return Message(content=_answer("evaluate", msg.content, context), reply_to=msg)


def _answer(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """The reply's content: from the device's worker when it runs, else computed here.

    Raises:
        DeviceError: The message could not be answered; the reason is logged here only.
    """
    try:
        return _compute(kind, content, context)
    except DeviceError:
        raise
    except Exception as err:
        logger.error("the %s message failed on this device: %s: %s", kind, type(err).__name__, err)
        raise DeviceError(error_code(err)) from None


def _compute(kind: str, content: RecordDict, context: Context) -> RecordDict:
    if context.node_config.get(worker.SOCKET_KEY):
        return worker.forward(str(context.node_config[worker.SOCKET_KEY]), kind, content, context)
    from client.federation import handlers  # torch, transformers, peft: only where the model runs

    return handlers.answer(kind, content, context)


def _forward(kind: str, msg: Message, context: Context) -> RecordDict:
    """The device worker's answer to ``msg`` (DeviceError with its code if it fails)."""
    try:
        return worker.forward(
            str(context.node_config[worker.SOCKET_KEY]),
            kind,
            msg.content,
            context,
            metadata=msg.metadata,
        )
    except DeviceError:
        raise
    except Exception as err:
        logger.error("the %s message failed on this device: %s: %s", kind, type(err).__name__, err)
        raise DeviceError(error_code(err)) from None
