"""fedpersona ClientApp: thin Flower wiring around the device.

One app serves both server paths. Message-API messages carry ``arrays`` + ``config``; the
SecAgg+ path uses Flower's legacy records (``fitins.*`` / ``evaluateins.*``) and the SecAgg+
protocol stages, which :func:`secagg_when_requested` hands to Flower's ``secaggplus_mod``.

This module imports Flower only. Flower starts a fresh ClientApp process for every message,
and three of a SecAgg+ round's five messages (setup, key sharing, unmasking) need no model:
they start in well under a second. Training and evaluation go to the device's long-lived
worker when the node config names one (``worker-socket``, see :mod:`client.worker`), where the
model stays loaded; otherwise :mod:`client.handlers` answers them in this process.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client import worker


def secagg_when_requested(msg: Message, ctxt: Context, call_next):  # type: ignore[no-untyped-def]
    """Run Flower's ``secaggplus_mod`` for SecAgg+ messages; pass others straight through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


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
    """The reply's content: from the device's worker when it runs, else computed here."""
    socket_path = context.node_config.get(worker.SOCKET_KEY)
    if socket_path:
        try:
            return worker.forward(str(socket_path), kind, content, context)
        except worker.WorkerUnavailable as err:
            logger.warning("%s; answering the %s message in the ClientApp process", err, kind)
    from client import handlers  # torch, transformers, peft: only where the model runs

    return handlers.answer(kind, content, context)
