"""fedpersona ClientApp: thin Flower wiring around the device.

One app serves both server paths. Message-API messages carry ``arrays`` + ``config``; the
SecAgg+ path uses Flower's legacy records (``fitins.*`` / ``evaluateins.*``) and the SecAgg+
protocol stages, which :func:`secagg_when_requested` hands to Flower's ``secaggplus_mod``.

This module imports Flower only. Flower starts a fresh ClientApp process for every message,
and three of a SecAgg+ round's five messages (setup, key sharing, unmasking) need no model:
they start in well under a second (a real device's setup asks its worker whether it will
contribute; without a worker that check imports the accountant here). Training and
evaluation go to the device's long-lived worker when the node config names one
(``worker-socket``, see :mod:`client.worker`), where the model stays loaded; otherwise
:mod:`client.handlers` answers them in this process.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client import worker


def secagg_when_requested(msg: Message, ctxt: Context, call_next):  # type: ignore[no-untyped-def]
    """Run Flower's ``secaggplus_mod`` for SecAgg+ messages; pass others straight through.

    A real device that will not contribute leaves the round at setup
    (:func:`client.gate.setup_refusal`), and before it masks its update it checks the cohort
    it would be summed with (:func:`client.gate.cohort_refusal`); the server gets a code.
    """
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get(Key.STAGE) if msg.metadata.message_type == MessageType.TRAIN else None
    if stage in (Stage.SETUP, Stage.COLLECT_MASKED_VECTORS):
        try:
            if stage == Stage.SETUP:
                refused = _setup_refusal(ctxt)
            else:
                refused = _cohort_refusal(msg, ctxt, configs)
        except Exception as err:
            logger.error("the SecAgg+ check failed on this device: %s: %s", type(err).__name__, err)
            raise DeviceError(_code(err)) from None
        if refused:
            raise DeviceError("declined" if stage == Stage.SETUP else "cohort-too-small")
    return secaggplus_mod(msg, ctxt, call_next)


def _setup_refusal(ctxt: Context) -> str | None:
    """:func:`client.gate.setup_refusal`, asked of the device's worker when it runs (its
    ledger check needs the accountant, which loads torch)."""
    from client.gate import setup_refusal
    from common.config import parse_run_config

    socket_path = ctxt.node_config.get(worker.SOCKET_KEY)
    if socket_path:
        try:
            reply = worker.forward(str(socket_path), worker.SETUP, RecordDict(), ctxt)
            return str(reply.config_records["setup"]["refused"]) or None
        except worker.WorkerUnavailable as err:
            logger.warning("%s; checking the SecAgg+ setup in the ClientApp process", err)
    return setup_refusal(
        parse_run_config(dict(ctxt.run_config)), ctxt.node_config, run=str(ctxt.run_id)
    )


def _cohort_refusal(msg: Message, ctxt: Context, configs) -> str | None:  # type: ignore[no-untyped-def]
    from client.gate import cohort_refusal
    from common.config import parse_run_config

    sources = configs.get(Key.SOURCE_LIST)
    if not isinstance(sources, list):
        raise ValueError("the masked-vector stage names no sources")
    fit_config = msg.content.config_records.get("fitins.config")
    server_round = fit_config.get("server-round") if fit_config is not None else None
    return cohort_refusal(
        parse_run_config(dict(ctxt.run_config)),
        ctxt.node_config,
        sources=len(sources),
        server_round=server_round if isinstance(server_round, int) else None,
    )


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


class DeviceError(RuntimeError):
    """What the server learns of a failure on the device: a code, no text from the device.

    Flower sends the text of an exception the ClientApp raises back to the server; paths,
    file names and whether a file exists stay in the device's own log.
    """

    def __init__(self, code: str) -> None:
        super().__init__(f"device error: {code} (the reason is in the device's log)")
        self.code = code


def _code(err: Exception) -> str:
    """The generic code of a failure (its class of cause, nothing of its text)."""
    if isinstance(err, (ValueError, KeyError, TypeError)):
        return "rejected-message"
    if isinstance(err, OSError):
        return "storage"
    return "internal"


def _answer(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """The reply's content: from the device's worker when it runs, else computed here.

    Raises:
        DeviceError: The message could not be answered; the reason is logged here only.
    """
    try:
        return _compute(kind, content, context)
    except Exception as err:
        logger.error("the %s message failed on this device: %s: %s", kind, type(err).__name__, err)
        raise DeviceError(_code(err)) from None


def _compute(kind: str, content: RecordDict, context: Context) -> RecordDict:
    socket_path = context.node_config.get(worker.SOCKET_KEY)
    if socket_path:
        try:
            return worker.forward(str(socket_path), kind, content, context)
        except worker.WorkerUnavailable as err:
            logger.warning("%s; answering the %s message in the ClientApp process", err, kind)
    from client import handlers  # torch, transformers, peft: only where the model runs

    return handlers.answer(kind, content, context)
