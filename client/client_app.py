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
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.federation import worker
from client.federation.errors import DeviceError, error_code
from client.federation.secagg_stage import checked_secaggplus


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
