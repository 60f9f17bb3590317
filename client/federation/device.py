"""One device's federated round, independent of the Flower API style that drives it.

:class:`Device` works on one encrypted store: the user's examples (:mod:`client.store.examples`: the
endorsed interactions and imported writing, the newest held out), the device's state and its
privacy ledger. A simulated device is the same class over a store filled, through the import
path, with its replayed role or its corpus user's data
(:func:`client.store.ingest.fill_simulated_store`). :meth:`Device.train` and :meth:`Device.evaluate`
take the global shared tensors and return the shared tensors to send plus scalar metrics; the
ClientApp (Message API, or SecAgg+'s legacy records) wraps the same calls.

The base model and its peft wrapper are cached per process
(:func:`client.federation.runtime.get_runtime`): a Ray actor serves many simulated devices with one
model, and every call re-loads that device's tensors in place, so no state leaks from one device to
the next.

(One file on purpose, over the usual length: a round is one sequence — admit, train, privatize,
commit — over the device's store, state, ledger and encoded examples, which its constructor
opens together. What the device measures on its held-out examples is in
client/federation/evaluation.py, what only a simulated device has in
client/federation/simulated.py, the store in client/store/, the model cache in
client/federation/runtime.py.)
"""

from __future__ import annotations

import hashlib
import logging
import time
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.federation import baseline
from client.federation.evaluation import DeviceEvaluation
from client.federation.gate import open_real_store
from client.federation.ledger import BudgetExhausted, Charges, PrivacyLedger
from client.federation.policy import DevicePolicy, PolicyRefused
from client.federation.runtime import get_runtime
from client.federation.simulated import planted_canaries, simulated_ratings, simulated_user
from client.store import DEFAULT_RETENTION_DAYS, LocalStore, open_beside_key
from client.store.examples import Example, device_examples, split, too_few_examples
from client.store.ingest import fill_simulated_store
from client.store.state import (
    LOCAL_USER,
    META_BLOB,
    SETTINGS_BLOB,
    DeviceState,
    as_stored,
    lora_fingerprint,
    paused_since,
    settings_from,
)
from common import ab, loss_sums
from common.config import RunConfig
from common.data import Encoded, Sample, encode
from common.dp.discrete import DiscreteParams, offer_problem, round_seed
from common.dp.privatize import Privatize, uniform_weights
from common.lora import (
    get_lora_tensors,
    load_lora_tensors,
)
from common.train import (
    train_steps,
    train_steps_dp,
)

logger = logging.getLogger(__name__)


# Tokenized data of the devices this process served lately (a Ray actor serves many simulated
# devices); bounded, so memory stays flat in the number of users.
_ENCODED: OrderedDict[tuple, tuple[tuple[Encoded, ...], ...]] = OrderedDict()
ENCODED_CACHE_SIZE = 16
# DP-SGD's Poisson batches and noise come from the OS's randomness (``None``): a seed from the
# round and the user would let the server rebuild the batches. Tests may fix it.
DP_SGD_SEED: int | None = None


# The release a real device last evaluated: run, round, the tensors' digest and how often.
EVALUATED_BLOB = "evaluated_release"


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A digest of global tensors as the store keeps them (names, shapes, values)."""
    h = hashlib.sha256()
    for name, t in sorted(as_stored(dict(tensors)).items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def _same_round(seen: Any, run: str, server_round: int) -> bool:
    """Whether a kept :data:`EVALUATED_BLOB` record is of round ``server_round`` of ``run``."""
    return isinstance(seen, dict) and seen.get("run") == run and seen.get("round") == server_round


def open_node_store(
    node_config: Mapping[str, Any], *, simulated_dir: Path | None = None
) -> LocalStore:
    """Open (creating on first use) the encrypted store a SuperNode's node config points at.

    ``data-dir`` names the store's directory and ``key-file`` its key (else
    ``$FEDPERSONA_PASSPHRASE``); ``retention-days`` overrides the 28-day default. A simulated
    device (no ``data-dir``) keeps its store in ``simulated_dir`` and a generated key file
    beside it, ``<dir>.key`` — convenient for simulations, not a protection on a real device.

    Raises:
        ValueError: If a real device has no key.
    """
    if "data-dir" in node_config:
        return open_real_store(node_config)
    if simulated_dir is None:
        raise ValueError("node config has no data-dir")
    retention = float(node_config.get("retention-days", DEFAULT_RETENTION_DAYS))
    return open_beside_key(simulated_dir, create=True, retention_days=retention)


class TooFewExamples(RuntimeError):
    """The store holds fewer training examples than ``data.min-examples``."""


class Paused(RuntimeError):
    """The device's owner paused its federation (it declines every round, charging nothing)."""


@dataclass
class TrainResult:
    """What one training round produced on the device.

    Attributes:
        update: The shared tensors' update (new - global), clipped to ``dp.clip-norm`` and, in
            ``distributed`` mode, noised; all zeros when the device declined.
        metrics: Scalar metrics allowed to leave the device.
        declined: The ledger refused this round; nothing was trained or spent.
        ab: The round's A/B counts ``[n, Σr, Σr²]`` per arm (``common/ab.py``), or ``None``.
        encoded: ``skellam`` mode: the update as the integers SecAgg+ masks (rotated, scaled,
            rounded, with the device's noise share; :mod:`common.dp.discrete`), and
            ``update`` is empty; ``None`` when declined or in another mode.
        canary: A canary client of the privacy audit sent it (:mod:`client.federation.canary`),
            not a user: it counts in the sum, not in the users' training metrics.
        losses: ``eval.secure-sums`` inside SecAgg+'s masked stage: the held-out losses of
            the model the round started from (:func:`common.loss_sums.vector`), summed with
            the cohort's; ``None`` otherwise (zeros ride in the masked vector).
        noise_share: The device declined inside the masked stage of a SecAgg+ round it had
            joined, and ``update`` (or ``encoded``) is its share of the round's noise alone:
            it sits in the sum the server unmasks with weight 1 (a zero update), so the sum
            carries every masked vector's noise (:meth:`Device._decline`).
    """

    update: dict[str, torch.Tensor]
    metrics: dict[str, float | int]
    declined: bool
    ab: np.ndarray | None = None
    encoded: np.ndarray | None = None
    canary: bool = False
    noise_share: bool = False
    losses: np.ndarray | None = None


# Rounds whose record keeps every tensor's name and shape (older ones keep the totals).
SENT_DETAIL_ROUNDS = 16


def _trim_sent(history: list[dict[str, Any]]) -> None:
    """Drop the tensor list of all but the last ``SENT_DETAIL_ROUNDS`` rounds' records (the
    device record stays small over years of rounds)."""
    trained = [h for h in history if isinstance(h.get("sent"), dict)]
    for h in trained[:-SENT_DETAIL_ROUNDS]:
        h["sent"].pop("tensors", None)


def round_record(
    server_round: int, run: str, *, loss: float, norm: float | None, sent: dict[str, Any]
) -> dict[str, Any]:
    """A trained round's entry in the device's history."""
    return {
        "round": server_round,
        "run": run,
        "time": time.time(),
        "train_loss": loss,
        "update_norm_before_clip": norm,
        "sent": sent,
    }


def what_leaves(
    update: Mapping[str, torch.Tensor],
    masked: bool,
    ab_counts: np.ndarray | None,
    *,
    encoded: np.ndarray | None = None,
) -> dict[str, Any]:
    """What a round's reply carries, for the owner's record: each tensor's name, shape and
    bytes (32-bit numbers: the update's floats, or SecAgg+'s masked integers in their place;
    in ``skellam`` mode the one rotated integer vector), the A/B counts' numbers and whether
    the server saw it masked — never a value."""
    tensors = [
        {"name": n, "shape": list(t.shape), "bytes": 4 * t.numel()} for n, t in update.items()
    ]
    if encoded is not None:
        tensors.append(
            {"name": "skellam-integers", "shape": [int(encoded.size)], "bytes": 4 * encoded.size}
        )
    return {
        "masked": masked,
        "tensors": tensors,
        "ab_numbers": 0 if ab_counts is None else int(np.asarray(ab_counts).size),
        "bytes": sum(t["bytes"] for t in tensors),
    }


class Device(DeviceEvaluation):
    """A user's device in one run: its store (examples, state, ledger) and its rounds.

    Args:
        cfg: Parsed run config.
        store: The device's open encrypted store.
        num_partitions: Size of the federation, for the distributed-noise share (m_min).
        partition_id: In simulation, the index of the role the device replays (a label for
            the server's summary, and where audit canaries are planted); ``None`` on a real
            device.
        user: Who the device's state belongs to (simulation: the role); default: the store's
            own record, else ``local``.
        local_baseline: Also train and evaluate the local-only baseline (default:
            ``eval.local-only``; a real device's owner must agree, see the ClientApp).
        policy: What the device accepts from the server (:mod:`client.federation.policy`); default:
            the policy kept in its store, else — kept there from now on — the protective defaults
            (:meth:`simulated` passes the simulation's own run config).
        simulated: A simulation's device (:meth:`simulated`): only such a device plants the
            audit's canaries or rates answers for the A/B test by itself; on a real device
            nothing the server sends (``partition-id``, ``audit.*``, ``ab.simulate-ratings``)
            changes what it trains on or reports.
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        store: LocalStore,
        num_partitions: int,
        partition_id: int | None = None,
        user: str | None = None,
        local_baseline: bool | None = None,
        policy: DevicePolicy | None = None,
        simulated: bool = False,
    ) -> None:
        self.cfg = cfg
        self.simulated = simulated
        self.local_baseline = cfg.eval.local_only if local_baseline is None else local_baseline
        self.partition_id = partition_id
        self.num_partitions = num_partitions
        self.rt = get_runtime(cfg)
        self.store = store
        if user is None:
            meta = store.get_json(META_BLOB)
            stored = meta.get("user") if isinstance(meta, dict) else None
            user = stored if isinstance(stored, str) else LOCAL_USER
        self.user = user
        self.state = DeviceState(
            store,
            user=user,
            strategy=cfg.strategy,
            model=cfg.model.name,
            lora=lora_fingerprint(cfg.model),
        )
        settings = settings_from(cfg)
        if store.get_json(SETTINGS_BLOB) != settings:
            store.put_json(SETTINGS_BLOB, settings)
        self.train_examples, self.held_out = split(device_examples(store), cfg.data.test_fraction)
        self.train_set, self.select_set, self.test_set = self._encoded()
        stored = DevicePolicy.load(store)
        policy = policy or stored or DevicePolicy()
        if stored != policy:
            policy.save(store)
        self.policy = policy
        self.ledger = PrivacyLedger.load(store, policy.caps)

    @classmethod
    def simulated(
        cls, cfg: RunConfig, *, store: LocalStore, partition_id: int, num_partitions: int
    ) -> Device:
        """A simulated device: ``store`` filled (once) with the data of the user
        ``partition_id`` picks (a role, or a corpus user), through the same import path a
        user's own writing takes."""
        user = simulated_user(cfg, partition_id, num_partitions)
        fill_simulated_store(store, user)
        return cls(
            cfg,
            store=store,
            num_partitions=num_partitions,
            partition_id=partition_id,
            user=user.user,
            # Whoever runs the simulation owns its devices: their policy is its config.
            policy=DevicePolicy.load(store) or DevicePolicy.from_run_config(cfg),
            simulated=True,
        )

    def _encoded(self) -> tuple[tuple[Encoded, ...], tuple[Encoded, ...], tuple[Encoded, ...]]:
        """The tokenized training examples, and the held-out slice in two parts: every other
        example (the oldest first, at most ``data.max-test-samples``) for reporting, the rest
        (at most ``data.max-select-samples``) for the device's own decisions (cached in memory,
        never on disk)."""
        content = hash(tuple((e.prompt, e.reply) for e in (*self.train_examples, *self.held_out)))
        key = (
            str(self.store.root),
            content,
            len(self.held_out),
            self.partition_id,
            self.simulated,
            self.cfg.model.name,
            self.cfg.data,
            self.cfg.audit,
        )
        if key not in _ENCODED:
            tok, n = self.rt.tokenizer, self.cfg.data.max_seq_len

            def enc(examples: list[Example]) -> tuple[Encoded, ...]:
                return tuple(encode(Sample(e.prompt, e.reply), tok, n) for e in examples)

            # Audit canaries (the audit's own secrets, not the user's) join the training set.
            canaries = planted_canaries(
                self.cfg, self.partition_id if self.simulated else None, tok, n
            )
            train = enc(self.train_examples) + canaries
            reported = self.held_out[0::2][: self.cfg.data.max_test_samples]
            rest = self.held_out[1::2] + self.held_out[2 * len(reported) :: 2]
            test = enc(reported)
            select = enc(rest[: self.cfg.data.max_select_samples])
            _ENCODED[key] = (train, select, test)
            while len(_ENCODED) > ENCODED_CACHE_SIZE:
                _ENCODED.popitem(last=False)
        _ENCODED.move_to_end(key)
        return _ENCODED[key]

    @property
    def pad_id(self) -> int:
        """Padding token id of the tokenizer."""
        return int(self.rt.tokenizer.pad_token_id)

    def planned_charges(
        self, server_round: int, *, run: str = "", self_sampled: bool = False
    ) -> Charges:
        """``(record, user, alone)`` charges of round ``server_round`` of run ``run``
        (:meth:`DevicePolicy.planned_charges`)."""
        return self.policy.planned_charges(
            self.cfg,
            self.ledger,
            num_train=len(self.train_set),
            server_round=server_round,
            num_partitions=self.num_partitions,
            run=run,
            self_sampled=self_sampled,
            rounding=self.discrete.charge if self.privatize.discrete else None,
        )

    @property
    def privatize(self) -> Privatize:
        """How this device privatizes its update (from the public run config only)."""
        return Privatize.of(self.cfg, self.num_partitions)

    @property
    def discrete(self) -> DiscreteParams:
        """``skellam`` mode: the integer encoding this device derives for its shared update."""
        dim = sum(int(np.prod(self.rt.shapes[n])) for n in self.rt.shared_names)
        return self.privatize.discrete_params(dim)

    def offer_problem(self, offer: Mapping[str, Any] | None, *, run: str, server_round: int):
        """``skellam`` mode: why this device will not encode under the server's round config
        ``offer`` (its seed, scale, bit width and length must be the device's own derivation,
        :func:`common.dp.discrete.offer_problem`); ``None``: it will, or nothing is encoded."""
        if not self.privatize.discrete or offer is None:
            return None
        return offer_problem(dict(offer), self.discrete, round_seed(run, server_round))

    def ab_counts(
        self,
        global_shared: dict[str, torch.Tensor],
        personal: dict[str, torch.Tensor] | None,
        server_round: int,
    ) -> np.ndarray | None:
        """This round's A/B counts: the user's ratings of answers from a coin-chosen model.

        Ratings the assistant recorded in the store come first; in simulation a simulated
        user rates answers to held-out prompts (``common.ab.simulated_rating``). At most
        ``ab.interactions`` per round, so the vector stays inside the SecAgg+ range. A real
        device counts its user's ratings only with the owner's consent (policy
        ``share-ab-counts``): ``None`` otherwise (zeros ride in the masked vector).
        """
        k = self.cfg.ab.interactions
        if k == 0 or not (self.simulated or self.policy.share_ab_counts):
            return None
        last = int(self.store.get_meta("ab_reported_until", "0") or 0)
        stored = self.store.rated_variants(after_feedback_id=last)[-k:]
        pairs = [(v, r) for _, v, r in stored if v in ab.ARMS]
        if stored:
            self.store.set_meta("ab_reported_until", str(stored[-1][0]))
        if self.cfg.ab.simulate_ratings and self.simulated:
            models = {
                "base": self.rt.init,
                "global": self.global_model(global_shared),
                "personal": self.served(global_shared, personal),
            }
            pairs += simulated_ratings(
                self.rt.model,
                models,
                self.test_set,
                seed=self.cfg.seed,
                user=self.user,
                batch_size=self.cfg.train.batch_size,
                server_round=server_round,
                count=k - len(pairs),
            )
        return ab.counts(pairs)

    def train(
        self,
        global_shared: dict[str, torch.Tensor],
        *,
        server_round: int,
        run: str = "",
        masked: bool | None = None,
        self_sampled: bool = False,
        offer: Mapping[str, Any] | None = None,
    ) -> TrainResult:
        """One round: check the round against the device's policy and ledger, train locally,
        clip and noise the shared update (in ``skellam`` mode: encode it as integers with its
        noise share, :attr:`TrainResult.encoded`).

        Args:
            global_shared: The server's shared tensors.
            server_round: The round number (in federation run ``run``).
            run: The federation run (the ledger keys its charges by it).
            masked: The update leaves under SecAgg+ masking: true only where the caller
                masks it (:func:`client.federation.secagg_stage.masking`); default, for a
                simulation's in-process callers: ``secagg.enabled`` on a simulated device,
                false on a real one.
            self_sampled: The device drew its own participation coin at ``fraction-train``.
            offer: The round's config from the server (``skellam`` mode: checked by
                :meth:`offer_problem`; the round is declined with the reason on a mismatch).

        Personal tensors and the ledger are saved here; only the returned update and metrics
        may leave the device (through the outbound-record builder).
        """
        if masked is None:
            masked = self.cfg.secagg.enabled and self.simulated
        try:
            problem = self.offer_problem(offer, run=run, server_round=server_round)
            if problem is not None:
                raise PolicyRefused(problem)
            charges = self._admit(server_round, run=run, masked=masked, self_sampled=self_sampled)
        except (Paused, PolicyRefused, BudgetExhausted, TooFewExamples) as err:
            return self._decline(global_shared, server_round, err, masked=masked, run=run)

        personal = self.state.load_personal()
        ab_counts = self.ab_counts(global_shared, personal, server_round)
        losses = self.loss_entry(global_shared) if masked and self.cfg.eval.secure_sums else None
        start = self.rt.strategy.round_start(self.rt.init, global_shared, personal)
        common = self._train_args(server_round)
        loss, after, update = self._train_locally(start, common)
        local_only = self._train_baseline(common)
        names, privatize = self.rt.shared_names, self.privatize
        update, norm, encoded = privatize.leaving(update, names, run=run, server_round=server_round)
        sent = what_leaves(update, masked, ab_counts, encoded=encoded)
        self._commit(
            server_round,
            run=run,
            personal=({n: start[n] for n in self.rt.personal_names}, after),
            local_only=local_only,
            charges=charges,
            record=round_record(server_round, run, loss=loss, norm=norm, sent=sent),
        )
        weight = 1 if uniform_weights(self.cfg) else len(self.train_set)
        return TrainResult(
            update,
            {
                "train_loss": loss,
                "num-examples": len(self.train_set),
                "weight": weight,
                "declined": 0,
                **self._label(),
                **self._privacy_metrics(),
            },
            declined=False,
            ab=ab_counts,
            encoded=encoded,
            losses=losses,
        )

    def _train_baseline(self, common: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The local-only baseline's round with the same settings, where the device trains
        one (its tensors after), else ``None``."""
        if not self.local_baseline or self.rt.strategy.local_only_personal:
            return None
        local_only, _ = baseline.train_round(
            self.rt.model,
            baseline.load(self.store),
            strategy=self.rt.strategy,
            init=self.rt.init,
            examples=self.train_set,
            precision=self.cfg.train.precision,
            **common,
        )
        return local_only

    @torch.no_grad()
    def loss_entry(self, global_shared: dict[str, torch.Tensor]) -> np.ndarray:
        """This device's entry in a round's SecAgg+ loss sums (``eval.secure-sums``): the
        held-out losses of the base, the global and the served model as the round starts —
        the tensors it trains from, as it would serve them — changing nothing."""
        report = self.held_out_report(as_stored(global_shared))
        return loss_sums.vector(
            base=report["base_loss"], global_=report["global_loss"], served=report["personal_loss"]
        )

    def evaluate(
        self, global_shared: dict[str, torch.Tensor], *, server_round: int, run: str = ""
    ) -> dict[str, float | int]:
        """:meth:`DeviceEvaluation.evaluate`, under the owner's rules on a real device.

        A real device evaluates — and takes up as the model it serves — only the global
        tensors of a round it trained in (the release it contributed to under terms it
        accepted), only the first tensors such a round brings, at most ``max-evaluations``
        times per round, and not while paused. Its per-device losses leave only when its
        owner shares them (policy ``share-losses``); otherwise the reply says they were
        withheld (``losses_withheld``) and carries nothing else. A simulated device (the
        simulation reads its own devices) reports every round.
        """
        if self.simulated:
            return super().evaluate(global_shared, server_round=server_round)
        withheld: dict[str, float | int] = {"losses_withheld": 1, "num-examples": 0}
        digest = _digest(global_shared)
        reason = self._evaluation_refusal(run, server_round, digest)
        if reason is not None:
            logger.warning("device does not evaluate round %s: %s", server_round, reason)
            return withheld
        seen = self.store.get_json(EVALUATED_BLOB)
        count = seen["count"] if _same_round(seen, run, server_round) else 0
        self.store.put_json(
            EVALUATED_BLOB,
            {"run": run, "round": server_round, "digest": digest, "count": count + 1},
        )
        metrics = super().evaluate(global_shared, server_round=server_round)
        return metrics if self.policy.share_losses else withheld

    def _evaluation_refusal(self, run: str, server_round: int, digest: str) -> str | None:
        """Why a real device will not evaluate these global tensors (``None``: it will)."""
        if paused_since(self.store) is not None:
            return "paused by the device's owner"
        terms = self.policy.refusal(self.cfg, num_partitions=self.num_partitions, masked=True)
        if terms is not None:
            return f"the run's terms are not this device's: {terms}"
        if not self.sent_in(run, server_round):
            return (
                f"it did not train in round {server_round} of run {run!r}: these tensors are "
                "no release it took part in"
            )
        seen = self.store.get_json(EVALUATED_BLOB)
        if _same_round(seen, run, server_round):
            if seen["digest"] != digest:
                return "the round's release was already evaluated, and these tensors differ"
            if seen["count"] >= self.policy.max_evaluations:
                return (
                    f"round {server_round} was evaluated {seen['count']} time(s) already "
                    f"(max-evaluations {self.policy.max_evaluations})"
                )
        return None

    def _train_args(self, server_round: int) -> dict[str, Any]:
        """The round's local-training settings (the seed from the round and the user)."""
        return dict(
            steps=self.cfg.train.local_steps,
            batch_size=self.cfg.train.batch_size,
            learning_rate=self.cfg.train.learning_rate,
            seed=zlib.crc32(f"{self.cfg.seed}:{server_round}:{self.user}".encode()),
            pad_id=self.pad_id,
        )

    def _commit(
        self,
        server_round: int,
        *,
        run: str,
        personal: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
        local_only: dict[str, torch.Tensor] | None,
        charges: Charges,
        record: dict[str, Any],
    ) -> None:
        """Keep a trained round in one store transaction: a device killed here restarts with
        the previous round's personal tensors, ledger and record, or with all three of this
        round's (the update is only sent after the charge is committed).

        Args:
            personal: The personal tensors before and after the round (merged with any
                feedback the user gave meanwhile: device serve, another process).
            local_only: The local-only baseline's tensors after the round, if it trained.
            charges: The round's ``(record, user, alone)`` charges.
            record: The round's entry in the device's history.
        """
        before, after = personal
        with self.store.batch():
            self.state.update_personal(before, {n: after[n] for n in self.rt.personal_names})
            if local_only is not None:
                baseline.save(self.store, local_only)
            self.ledger.charge(server_round=server_round, run=run, **charges._asdict())
            self.ledger.save(self.store)
            self.state.meta.rounds_trained += 1
            self.state.meta.last_round = server_round
            self.state.meta.history.append(record)
            _trim_sent(self.state.meta.history)
            self.state.save_meta()

    def _admit(self, server_round: int, *, run: str, masked: bool, self_sampled: bool) -> Charges:
        """The round's ``(record, user, alone)`` charges, once the policy, the data and the ledger
        all admit it.

        Raises:
            Paused: The owner paused the federation on this device.
            PolicyRefused: The owner's policy refuses the round's terms, or the device
                already sent an update in this round.
            TooFewExamples: Fewer examples than ``data.min-examples``.
            BudgetExhausted: A charge would pass a cap.
        """
        since = paused_since(self.store)
        if since is not None:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(since))
            raise Paused(
                f"paused by the device's owner since {when} (`fedpersona device federation resume`)"
            )
        reason = self.policy.refusal(self.cfg, num_partitions=self.num_partitions, masked=masked)
        if reason is not None:
            raise PolicyRefused(reason)
        if self.sent_in(run, server_round):
            raise PolicyRefused(
                f"this device already sent an update in round {server_round} of run {run!r}; "
                "it answers each round once"
            )
        shortfall = too_few_examples(len(self.train_examples), self.cfg.data.min_examples)
        if shortfall is not None:
            raise TooFewExamples(shortfall)
        charges = self.planned_charges(server_round, run=run, self_sampled=self_sampled)
        self.ledger.check(**charges._asdict())
        return charges

    def sent_in(self, run: str, server_round: int) -> bool:
        """Whether this device already sent an update in round ``server_round`` of ``run``
        (its history keeps every trained round)."""
        return any(
            "sent" in h and h.get("run") == run and h.get("round") == server_round
            for h in self.state.meta.history
        )

    def _decline(
        self,
        global_shared: dict[str, torch.Tensor],
        server_round: int,
        err: Exception,
        *,
        masked: bool,
        run: str,
    ) -> TrainResult:
        """A declined round: logged and kept in the ledger with its reason; nothing is charged.

        Outside SecAgg+'s masked stage a zero update of weight 0 is all that leaves. Inside it
        the device is already in the cohort whose sum the server will unmask — its neighbours
        counted it when they checked the cohort — so with distributed noise it sends its noise
        share alone (a zero update, noised as any other; :attr:`TrainResult.noise_share`): a
        device that leaves late takes nothing away from the noise the others were promised.
        """
        share = masked and self.cfg.dp.distributed
        reason = str(err) + (" (its noise share alone was sent, masked)" if share else "")
        logger.warning("device %s declines round %s: %s", self.user, server_round, reason)
        self.ledger.note_declined(server_round=server_round, reason=reason)
        self.ledger.save(self.store)
        zeros = {n: torch.zeros_like(t) for n, t in global_shared.items()}
        encoded = None
        if share:
            zeros, _, encoded = self.privatize.leaving(
                zeros, self.rt.shared_names, run=run, server_round=server_round
            )
        return TrainResult(
            zeros,
            {
                **self._label(),
                "declined": 1,
                "weight": 0,
                "num-examples": 0,
                **({"noise_shares": 1} if share else {}),
                **self._privacy_metrics(),
            },
            declined=True,
            encoded=encoded,
            noise_share=share,
        )

    def _train_locally(
        self, start: dict[str, torch.Tensor], common: dict[str, Any]
    ) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The round's local steps from ``start`` (DP-SGD when ``dp.local`` is on).

        Returns:
            ``(mean training loss, the LoRA tensors after, the raw shared update)`` — the
            update is the shared tensors' change (blend: its personal adapter's change), or
            minus the sum of the round's gradients there (``personalization.update``).
        """
        load_lora_tensors(self.rt.model, start)
        source = {n: self.rt.strategy.update_source(n) for n in self.rt.shared_names}
        sums = (
            {src: torch.zeros_like(start[src], dtype=torch.float32) for src in source.values()}
            if self.cfg.personalization.update == "gradient"
            else None
        )
        if self.cfg.dp.local_enabled:
            loss, _ = train_steps_dp(
                self.rt.model,
                self.rt.trainable_names,
                self.train_set,
                noise_multiplier=self.cfg.dp.local_noise_multiplier,
                max_grad_norm=self.cfg.dp.local_max_grad_norm,
                **{**common, "seed": DP_SGD_SEED},
            )
        else:
            loss = train_steps(
                self.rt.model,
                self.rt.trainable_names,
                self.train_set,
                precision=self.cfg.train.precision,
                gradient_sums=sums,
                **common,
            )
        after = get_lora_tensors(self.rt.model)
        if sums is not None:
            update = {n: -sums[src] for n, src in source.items()}
        else:
            update = {n: after[src] - start[src].to(after[src].dtype) for n, src in source.items()}
        return loss, after, update
