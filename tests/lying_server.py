"""A dishonest server that plays a whole SecAgg+ cohort around one real device.

The device's worker (``fedpersona device worker``) is the trust boundary: the ClientApp the
server ships relays to it, so a lying server can send the worker anything a ClientApp can.
:class:`LyingServer` does just that over the worker's real socket: it runs SecAgg+'s stages
with the device as the only honest member and fake neighbours whose keys it made itself, so it
can take every mask off the device's vector (:meth:`LyingServer.unmask_device`) and read the
device's reply as it left — the update, its noise share and its weight — exactly as a server
running fake devices would. Nothing here is fedpersona's code: the masking is Flower's, undone
with Flower's own primitives.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import (
    pseudo_rand_gen,
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)
from flwr.supercore.task_identity import TaskIdentity

from client.federation import worker
from tests.conftest import make_context

DEVICE = 1  # the honest device's node id; the fakes' ids are all larger
_run_ids = itertools.count(1000)


@dataclass
class _Fake:
    """A neighbour the server made up: it holds both key pairs."""

    sk1: bytes
    pk1: bytes
    sk2: bytes
    pk2: bytes

    @classmethod
    def new(cls) -> _Fake:
        sk1, pk1 = generate_key_pairs()
        sk2, pk2 = generate_key_pairs()
        return cls(
            private_key_to_bytes(sk1),
            public_key_to_bytes(pk1),
            private_key_to_bytes(sk2),
            public_key_to_bytes(pk2),
        )


@dataclass
class Recovered:
    """The device's reply with every mask taken off: what a server with fake neighbours sees.

    Attributes:
        weight: The weight the device gave its vector (SecAgg+'s first entry, dequantized).
        vector: The rest, dequantized: the device's update and its noise share.
        raw: The same entries as the integers it masked (before dequantizing).
    """

    weight: float
    vector: np.ndarray
    raw: np.ndarray


@dataclass
class LyingServer:
    """A ServerApp (through the ClientApp it ships) that plays ``fakes`` neighbours itself.

    Args:
        sock: The device worker's socket.
        run_config: The run config the server sends (its claims: σ, m_min, …).
        fakes: How many made-up neighbours to put in the device's cohort.
        run_id: The federation run (a fresh one per server by default).
    """

    sock: Path
    run_config: dict[str, Any]
    fakes: int = 8
    run_id: int = field(default_factory=lambda: next(_run_ids))
    neighbours: dict[int, _Fake] = field(init=False)
    setup_configs: dict[str, Any] = field(init=False, default_factory=dict)
    device_keys: tuple[bytes, bytes] = field(init=False, default=(b"", b""))
    shares: dict[int, tuple[bytes, bytes]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.neighbours = {DEVICE + 1 + i: _Fake.new() for i in range(self.fakes)}

    # -- talking to the worker, as the ClientApp would ------------------------------------

    def send(
        self,
        content: RecordDict,
        *,
        kind: str = worker.SECAGG,
        message_type: str = MessageType.TRAIN,
        server_round: int = 1,
    ) -> RecordDict:
        """Relay ``content`` to the worker as the ClientApp does; its reply's content.

        Raises:
            DeviceError: The device refused (its code).
        """
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = self.run_id, 0, 1
        msg = Message(
            content=content,
            dst_node_id=DEVICE,
            message_type=message_type,
            group_id=str(server_round),
        )
        context = make_context(self.run_config, {worker.SOCKET_KEY: str(self.sock)})
        context.run_id, context.node_id = self.run_id, DEVICE
        return worker.forward(str(self.sock), kind, content, context, metadata=msg.metadata)

    def _stage(self, stage: str, configs: dict[str, Any], **kwargs: Any) -> ConfigRecord:
        content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage, **configs})})
        return self.send(content, **kwargs).config_records[RECORD_KEY_CONFIGS]

    # -- SecAgg+'s stages, with a cohort of fakes -----------------------------------------

    def setup(
        self,
        *,
        clipping_range: float,
        target_range: int = 1 << 20,
        mod_range: int = 1 << 32,
        sample: int | None = None,
        threshold: int | None = None,
        **kwargs: Any,
    ) -> None:
        """SecAgg+'s setup, claiming a cohort of ``sample`` (default: the device and the fakes)
        that all share with one another."""
        n = self.fakes + 1
        self.setup_configs = {
            Key.SAMPLE_NUMBER: sample if sample is not None else n,
            Key.SHARE_NUMBER: n,
            Key.THRESHOLD: threshold if threshold is not None else n // 2 + 1,
            Key.CLIPPING_RANGE: float(clipping_range),
            Key.TARGET_RANGE: int(target_range),
            Key.MOD_RANGE: int(mod_range),
            Key.MAX_WEIGHT: 1.0,
        }
        reply = self._stage(Stage.SETUP, self.setup_configs, **kwargs)
        self.device_keys = (reply[Key.PUBLIC_KEY_1], reply[Key.PUBLIC_KEY_2])

    def share_keys(self, **kwargs: Any) -> None:
        """Share keys: the device's shares for the fakes come back encrypted to keys the server
        holds, so it keeps them decrypted (:attr:`shares`)."""
        keys = {str(DEVICE): list(self.device_keys)}
        keys.update({str(nid): [f.pk1, f.pk2] for nid, f in self.neighbours.items()})
        reply = self._stage(Stage.SHARE_KEYS, keys, **kwargs)
        for dst, ciphertext in zip(
            reply[Key.DESTINATION_LIST], reply[Key.CIPHERTEXT_LIST], strict=True
        ):
            plain = decrypt(self._ss2(dst), ciphertext)
            _, _, seed_share, sk1_share = share_keys_plaintext_separate(plain)
            self.shares[int(dst)] = (seed_share, sk1_share)

    def _ss2(self, nid: int) -> bytes:
        fake = self.neighbours[nid]
        return generate_shared_key(
            bytes_to_private_key(fake.sk2), bytes_to_public_key(self.device_keys[1])
        )

    def fitins(self, shared: list[np.ndarray], server_round: int = 1, **config: Any) -> RecordDict:
        """The legacy fit message a SecAgg+ round carries (``config``: its fit config)."""
        ins = FitIns(ndarrays_to_parameters(shared), {"server-round": server_round, **config})
        return compat.fitins_to_recorddict(ins, True)

    def collect(
        self,
        shared: list[np.ndarray],
        *,
        server_round: int = 1,
        sources: list[int] | None = None,
        fit_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> list[np.ndarray]:
        """The masked-vector stage: ciphertexts "from" the fakes (``sources``: which ones, in
        that order, repeats allowed), the fit message with ``shared``; the masked vector."""
        sources = list(self.neighbours) if sources is None else sources
        ciphertexts = []
        for nid in sources:  # what each fake would have sent the device at share-keys
            fake_share = b"\x00" * 32  # the device never uses a live neighbour's shares
            plain = share_keys_plaintext_concat(nid, DEVICE, fake_share, fake_share)
            ciphertexts.append(encrypt(self._ss2(nid), plain))
        content = self.fitins(shared, server_round, **(fit_config or {}))
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(
            {
                Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                Key.CIPHERTEXT_LIST: ciphertexts,
                Key.SOURCE_LIST: sources,
            }
        )
        reply = self.send(content, server_round=server_round, **kwargs)
        self.last_reply = reply
        self.last_sources = sources
        masked = reply.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        return [bytes_to_ndarray(b) for b in masked]

    def unmask_device(self, masked: list[np.ndarray]) -> Recovered:
        """Take every mask off the device's vector: its private mask from the seed shares the
        fakes hold, its pairwise masks from the fakes' own secret keys."""
        threshold = int(self.setup_configs[Key.THRESHOLD])
        seed = combine_shares([s for s, _ in self.shares.values()][:threshold])
        mod = int(self.setup_configs[Key.MOD_RANGE])
        dims = [a.shape for a in masked]
        out = [a.astype(np.int64) for a in masked]
        private = pseudo_rand_gen(seed, mod, dims)
        out = [a - m for a, m in zip(out, private, strict=True)]
        for nid in set(self.last_sources):
            fake = self.neighbours[nid]
            key = generate_shared_key(
                bytes_to_private_key(fake.sk1), bytes_to_public_key(self.device_keys[0])
            )
            pairwise = pseudo_rand_gen(key, mod, dims)
            # The device (the smallest id) subtracted each pairwise mask.
            out = [a + m for a, m in zip(out, pairwise, strict=True)]
        out = [np.mod(a, mod) for a in out]
        clip = float(self.setup_configs[Key.CLIPPING_RANGE])
        target = int(self.setup_configs[Key.TARGET_RANGE])
        raw = np.concatenate([a.reshape(-1) for a in out[1:]])
        return Recovered(
            weight=float(out[0][0]) / target,
            vector=raw * (2 * clip / target) - clip,
            raw=raw,
        )

    def round(self, shared: list[np.ndarray], *, clipping_range: float, **kwargs: Any) -> Recovered:
        """Setup, share keys and collect with all the fakes; the device's reply, unmasked."""
        self.setup(clipping_range=clipping_range)
        self.share_keys()
        return self.unmask_device(self.collect(shared, **kwargs))
