"""Run configuration: parse Flower's flat ``run_config`` once into frozen, validated dataclasses.

(One file on purpose, over the usual length: the dataclasses here are the one list of the run
config's keys, their types, defaults and checks; the keys are read off them.)

Every tunable lives in ``[tool.flwr.app.config]`` of ``pyproject.toml`` (kebab case, dotted
groups). :func:`parse_run_config` is the only place that reads those keys; everything else
receives the typed :class:`RunConfig`. Invalid values raise ``ValueError`` naming the key.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

STRATEGIES = ("fedavg-ft", "ffa", "fedsa", "dual", "blend")
QUANTIZATIONS = ("none", "4bit")
DTYPES = ("auto", "float32", "bfloat16")
TRAIN_PRECISIONS = ("auto", "float32", "bfloat16")
NOISE_MODES = ("distributed", "skellam", "central", "none")
ACCOUNTANTS = ("rdp", "prv")
# How the server picks each round's training cohort: a fixed-size uniform sample of
# fraction-train of the nodes, or each node independently with probability fraction-train
# (Poisson: what the accountant's amplification by sampling assumes).
SAMPLINGS = ("fixed", "poisson")
# What a device sends for the shared tensors (personalization.update).
UPDATES = ("change", "gradient")
# The server's step along each round's mean change (server/optimizer.py).
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "yogi")

# Where a ServerApp puts its runs when the run config names no output.dir.
RUNS_DIR_ENV = "FEDPERSONA_RUNS_DIR"


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"invalid run config `{key}`: {msg}")


@dataclass(frozen=True)
class ModelConfig:
    """Base model and LoRA adapter settings."""

    name: str = "smollm2"
    lora_r: int = 4
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    # Which decoder layers carry LoRA, "first-last" (inclusive, 0-based); "" = all. Training
    # back-propagates only through the layers above the first one with LoRA.
    lora_layers: str = ""
    init_seed: int = 1234
    quantization: str = "none"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        _require(bool(self.name), "model.name", "must be 'smollm2', 'tiny' or a local directory")
        _require(
            self.quantization in QUANTIZATIONS,
            "model.quantization",
            f"must be one of {', '.join(QUANTIZATIONS)}; got {self.quantization!r}",
        )
        _require(
            self.dtype in DTYPES,
            "model.dtype",
            f"must be one of {', '.join(DTYPES)}; got {self.dtype!r}",
        )
        _require(1 <= self.lora_r <= 256, "model.lora-r", f"must be in [1, 256], got {self.lora_r}")
        _require(self.lora_alpha > 0, "model.lora-alpha", f"must be > 0, got {self.lora_alpha}")
        _require(
            0.0 <= self.lora_dropout < 1.0,
            "model.lora-dropout",
            f"must be in [0, 1), got {self.lora_dropout}",
        )
        try:
            self.layer_range()
        except ValueError as err:
            _require(False, "model.lora-layers", str(err))
        _require(
            len(self.lora_targets) > 0 and all(self.lora_targets),
            "model.lora-targets",
            "must name at least one module, e.g. 'q_proj,v_proj'",
        )

    def layer_range(self) -> tuple[int, int] | None:
        """``model.lora-layers`` as ``(first, last)``, or ``None`` for every layer.

        Raises:
            ValueError: If it is not "first-last" with 0 <= first <= last.
        """
        return parse_layer_range(self.lora_layers)


def parse_layer_range(text: str) -> tuple[int, int] | None:
    """``"first-last"`` (0-based, inclusive) as a pair; ``""`` as ``None`` (every layer).

    Raises:
        ValueError: If it is not "first-last" with 0 <= first <= last.
    """
    if not text:
        return None
    first, sep, last = text.partition("-")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise ValueError(f"must be 'first-last' layer indices, e.g. '22-29'; got {text!r}")
    lo, hi = int(first), int(last)
    if lo > hi:
        raise ValueError(f"first layer {lo} is after the last {hi}")
    return lo, hi


@dataclass(frozen=True)
class PersonalizationConfig:
    """Settings of the personalization strategy (``blend`` only, so far).

    ``global_layers``: the decoder layers whose global-adapter tensors the federation trains
    (``""``: all). ``global_targets``: the LoRA target modules it trains there, comma-separated
    (``""``: all of ``model.lora-targets``). ``global_part``: ``AB`` or ``B`` (A stays at the
    shared initialisation).
    ``mix_prior``: the global adapter's weight a device serves unless its own held-out
    evidence says otherwise (one of ``MIX_WEIGHTS``; 0: only on evidence that it helps).
    ``update``: what a device sends for the shared tensors — ``change`` (how the tensors it
    trained moved this round) or ``gradient`` (minus the sum of this round's gradients there,
    the steepest-descent direction; clipped and noised alike).
    """

    global_layers: str = ""
    global_targets: str = ""
    global_part: str = "AB"
    mix_prior: float = 0.5
    update: str = "change"

    def __post_init__(self) -> None:
        try:
            self.global_layer_range()
        except ValueError as err:
            _require(False, "personalization.global-layers", str(err))
        _require(
            self.global_part in ("AB", "B"),
            "personalization.global-part",
            f"must be AB or B, got {self.global_part!r}",
        )
        _require(
            self.update in UPDATES,
            "personalization.update",
            f"must be one of {', '.join(UPDATES)}; got {self.update!r}",
        )
        from common.personalization.blend import MIX_WEIGHTS

        _require(
            self.mix_prior in MIX_WEIGHTS,
            "personalization.mix-prior",
            f"must be one of {', '.join(f'{w:g}' for w in MIX_WEIGHTS)}; got {self.mix_prior!r}",
        )

    def global_layer_range(self) -> tuple[int, int] | None:
        """``global_layers`` as ``(first, last)``, or ``None``."""
        return parse_layer_range(self.global_layers)

    def global_target_names(self) -> tuple[str, ...] | None:
        """``global_targets`` as module names, or ``None`` (all LoRA targets)."""
        names = tuple(t.strip() for t in self.global_targets.split(",") if t.strip())
        return names or None


@dataclass(frozen=True)
class DataConfig:
    """A device's data: how much it needs to join, what it holds out, how samples are cut;
    and, in simulation, which Shakespeare roles become users."""

    min_lines: int = 200
    num_users: int = 0
    test_fraction: float = 0.2
    max_seq_len: int = 96
    max_test_samples: int = 16
    # The device's own decisions (its mixing weight) use the rest of the held-out slice, up to
    # this many examples: a user with more data decides on more evidence.
    max_select_samples: int = 16
    min_examples: int = 8
    # Simulation: a per-user corpus (a folder, one file or sub-folder per user, or one JSONL
    # of records with a user id; :mod:`common.corpus`) instead of the Shakespeare roles.
    corpus: str = ""

    def __post_init__(self) -> None:
        _require(self.min_lines >= 1, "data.min-lines", f"must be >= 1, got {self.min_lines}")
        _require(self.num_users >= 0, "data.num-users", f"must be >= 0, got {self.num_users}")
        _require(
            0.0 < self.test_fraction < 1.0,
            "data.test-fraction",
            f"must be in (0, 1), got {self.test_fraction}",
        )
        _require(
            16 <= self.max_seq_len <= 4096,
            "data.max-seq-len",
            f"must be in [16, 4096], got {self.max_seq_len}",
        )
        _require(
            self.max_test_samples >= 1,
            "data.max-test-samples",
            f"must be >= 1, got {self.max_test_samples}",
        )
        _require(
            self.max_select_samples >= 1,
            "data.max-select-samples",
            f"must be >= 1, got {self.max_select_samples}",
        )
        _require(
            self.min_examples >= 1,
            "data.min-examples",
            f"must be >= 1, got {self.min_examples}",
        )


@dataclass(frozen=True)
class TrainConfig:
    """Local training on a device, per round."""

    local_steps: int = 5
    batch_size: int = 4
    learning_rate: float = 5e-3
    # The forward/backward precision of training on a CPU with an fp32 base: "auto" (bf16
    # autocast where the CPU computes bf16 natively and a first batch's loss agrees with fp32's),
    # "float32" or "bfloat16". A CUDA or bf16 base follows model.dtype. Evaluation stays fp32.
    precision: str = "auto"

    def __post_init__(self) -> None:
        _require(
            self.precision in TRAIN_PRECISIONS,
            "train.precision",
            f"must be one of {', '.join(TRAIN_PRECISIONS)}; got {self.precision!r}",
        )
        _require(
            self.local_steps >= 1, "train.local-steps", f"must be >= 1, got {self.local_steps}"
        )
        _require(self.batch_size >= 1, "train.batch-size", f"must be >= 1, got {self.batch_size}")
        _require(
            0.0 < self.learning_rate < 1.0,
            "train.learning-rate",
            f"must be in (0, 1), got {self.learning_rate}",
        )


@dataclass(frozen=True)
class DPConfig:
    """User-level DP on the shared update, and record-level DP-SGD on the device.

    ``noise_mode``: ``distributed`` (each client adds N(0, (σC)²/m_min) before SecAgg+),
    ``skellam`` (each client adds its share of Skellam noise as integers inside SecAgg+'s
    field, after a rotation and stochastic rounding: :mod:`common.dp.discrete`),
    ``central`` (the server adds N(0, (σC)²) to the unmasked sum) or ``none`` (clipping only
    when ``clip_norm`` > 0). ``min_clients`` is m_min, the fewest updates the server accepts
    for a round (0: every sampled client must report).

    ``honest_fraction`` h: the share of any cohort the noise is sized to hold honest devices:
    each device's share is σC/√⌊h·m_min⌋, so that the honest ⌊h·m_min⌋ of a cohort of m_min
    add N(0, (σC)²) between them even when the rest are the server's own (h = 1: every device
    is honest). ``share_floor``: every device's share is at least ``share_floor``·C, so that
    its update alone — every other member of its cohort the server's — is a Gaussian mechanism
    with noise multiplier ``share_floor`` (0: no floor). Both are what the devices' policies
    check (``client/federation/policy.py``); docs/privacy.md, "Threat model".
    """

    noise_mode: str = "distributed"
    clip_norm: float = 0.05
    noise_multiplier: float = 7.1
    min_clients: int = 0
    honest_fraction: float = 1.0
    share_floor: float = 0.0
    local_enabled: bool = field(default=False, metadata={"key": "dp.local.enabled"})
    local_noise_multiplier: float = field(
        default=1.0, metadata={"key": "dp.local.noise-multiplier"}
    )
    local_max_grad_norm: float = field(default=1.0, metadata={"key": "dp.local.max-grad-norm"})

    def __post_init__(self) -> None:
        _require(
            self.noise_mode in NOISE_MODES,
            "dp.noise-mode",
            f"must be one of {', '.join(NOISE_MODES)}; got {self.noise_mode!r}",
        )
        _require(self.clip_norm >= 0, "dp.clip-norm", f"must be >= 0, got {self.clip_norm}")
        _require(
            self.noise_mode == "none" or self.clip_norm > 0,
            "dp.clip-norm",
            "must be > 0 when dp.noise-mode adds noise (it is the sensitivity)",
        )
        _require(
            self.noise_multiplier >= 0,
            "dp.noise-multiplier",
            f"must be >= 0, got {self.noise_multiplier}",
        )
        _require(self.min_clients >= 0, "dp.min-clients", f"must be >= 0, got {self.min_clients}")
        _require(
            finite_number(self.honest_fraction) and 0 < self.honest_fraction <= 1,
            "dp.honest-fraction",
            f"must be in (0, 1], got {self.honest_fraction}",
        )
        _require(
            finite_number(self.share_floor) and self.share_floor >= 0,
            "dp.share-floor",
            f"must be >= 0 (0: no floor), got {self.share_floor}",
        )
        _require(
            self.local_noise_multiplier >= 0,
            "dp.local.noise-multiplier",
            f"must be >= 0, got {self.local_noise_multiplier}",
        )
        _require(
            self.local_max_grad_norm > 0,
            "dp.local.max-grad-norm",
            f"must be > 0, got {self.local_max_grad_norm}",
        )

    @property
    def adds_noise(self) -> bool:
        """True if the federation adds Gaussian noise to the aggregate."""
        return self.noise_mode != "none" and self.noise_multiplier > 0

    @property
    def distributed(self) -> bool:
        """True if each device adds its share of the noise itself (``distributed``:
        N(0, (σC)²/m_min); ``skellam``: the same variance as integers)."""
        return self.noise_mode in ("distributed", "skellam") and self.adds_noise

    @property
    def discrete(self) -> bool:
        """True if the devices' noise shares are Skellam integers inside SecAgg+."""
        return self.noise_mode == "skellam" and self.adds_noise


@dataclass(frozen=True)
class SecAggConfig:
    """SecAgg+ settings; the quantization parameters are derived (see common.secagg)."""

    enabled: bool = True
    # 0: each round's neighbourhood size from its cohort (common.secagg.neighbourhood_size).
    num_shares: float = 0.0
    reconstruction_threshold: float = 0.67
    timeout: float = 600.0
    # What the derived neighbourhood size assumes: the largest fraction of a round's devices
    # that drop out after sharing keys, and of devices that collude with the server.
    dropout_rate: float = 0.1
    corrupt_rate: float = 0.1

    def __post_init__(self) -> None:
        _require(
            self.num_shares >= 0,
            "secagg.num-shares",
            "must be >= 0 (0: derived from the cohort; a count; or a fraction of the cohort)",
        )
        _require(
            self.num_shares > 0 or self.reconstruction_threshold <= 1,
            "secagg.reconstruction-threshold",
            "must be a fraction of the neighbours (<= 1) when secagg.num-shares = 0 (derived)",
        )
        for key, rate in (
            ("secagg.dropout-rate", self.dropout_rate),
            ("secagg.corrupt-rate", self.corrupt_rate),
        ):
            _require(0 <= rate < 0.5, key, f"must be in [0, 0.5), got {rate}")
        _require(
            self.reconstruction_threshold > 0,
            "secagg.reconstruction-threshold",
            "must be > 0 (count or fraction)",
        )
        _require(self.timeout > 0, "secagg.timeout", "must be > 0 seconds")


def finite_number(value: Any) -> bool:
    """A finite number (``bool`` is not a number here: a policy file may hold anything)."""
    return type(value) in (int, float) and math.isfinite(value)


@dataclass(frozen=True)
class PrivacyCaps:
    """A device's privacy caps: the one declaration behind the run config's ``privacy.*``
    keys (:class:`PrivacyConfig`), the owner's policy
    (:class:`client.federation.policy.DevicePolicy`) and the ledger that enforces them
    (:class:`client.federation.ledger.PrivacyLedger`).

    Attributes:
        epsilon_cap: Lifetime cap on each of record- and user-level ε.
        delta: δ of every ε.
        accountant: ``rdp`` or ``prv``.
        period_days: Length of a budget period (0 = no per-period cap).
        period_epsilon_cap: Cap on the ε spent within one period (0 = none).
        worst_case_epsilon_cap: Cap on the ε of the device's updates *alone* — each with only
            its own noise share, as if every other member of its cohorts were the server's
            (the ledger's ``alone`` budget; 0 = no cap, it is reported either way).
    """

    epsilon_cap: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"
    period_days: float = 0.0
    period_epsilon_cap: float = 0.0
    worst_case_epsilon_cap: float = 0.0

    def __post_init__(self) -> None:
        for ok, key, what in self._checks():
            if not ok:
                raise ValueError(self._invalid(key, what))

    def _checks(self) -> list[tuple[bool, str, str]]:
        """``(holds, key, what it must be)`` for every field; subclasses add theirs."""
        return [
            (
                finite_number(self.epsilon_cap) and self.epsilon_cap > 0,
                "epsilon-cap",
                f"a number > 0, got {self.epsilon_cap!r}",
            ),
            (
                finite_number(self.delta) and 0 < self.delta < 1,
                "delta",
                f"in (0, 1), got {self.delta!r}",
            ),
            (
                self.accountant in ACCOUNTANTS,
                "accountant",
                f"one of {', '.join(ACCOUNTANTS)}; got {self.accountant!r}",
            ),
            (
                finite_number(self.period_days) and self.period_days >= 0,
                "period-days",
                ">= 0 (0 = none)",
            ),
            (
                finite_number(self.period_epsilon_cap) and self.period_epsilon_cap >= 0,
                "period-epsilon-cap",
                ">= 0 (0 = none)",
            ),
            (
                finite_number(self.worst_case_epsilon_cap) and self.worst_case_epsilon_cap >= 0,
                "worst-case-epsilon-cap",
                ">= 0 (0 = none)",
            ),
        ]

    @staticmethod
    def _invalid(key: str, what: str) -> str:
        return f"privacy.{key} must be {what}"

    @property
    def caps(self) -> PrivacyCaps:
        """Only the caps (what a ledger enforces), whatever carries them."""
        return PrivacyCaps(**{f.name: getattr(self, f.name) for f in fields(PrivacyCaps)})


@dataclass(frozen=True)
class PrivacyConfig(PrivacyCaps):
    """Privacy budgets: the caps every simulated device enforces (:class:`PrivacyCaps`) and the
    federation's target."""

    verifiable_sampling: bool = False
    target_epsilon: float = 0.0

    def _checks(self) -> list[tuple[bool, str, str]]:
        return [
            *super()._checks(),
            (self.target_epsilon >= 0, "target-epsilon", ">= 0 (0 = no target)"),
        ]

    @staticmethod
    def _invalid(key: str, what: str) -> str:
        return f"invalid run config `privacy.{key}`: must be {what}"


@dataclass(frozen=True)
class AuditConfig:
    """Privacy audits: Secret Sharer canaries planted in some users' training data."""

    canaries: int = 0
    canary_repeats: int = 20
    canary_users: int = 1
    # One-run audit (Steinke, Nasr & Jagielski 2023): each canary planted with probability ½,
    # canary j in user j mod canary-users' data only (see common/audit.py).
    one_run: bool = False
    # The user-level one-run audit (common/audit.py, "canary clients"): the last
    # canary-clients of data.num-users are simulated clients that send a random direction of
    # norm C (each taking part with probability ½), not users with data.
    canary_clients: int = 0

    def __post_init__(self) -> None:
        _require(0 <= self.canaries <= 100, "audit.canaries", "must be in [0, 100]")
        _require(
            0 <= self.canary_clients <= 100_000, "audit.canary-clients", "must be in [0, 100000]"
        )
        _require(self.canary_repeats >= 1, "audit.canary-repeats", "must be >= 1")
        _require(self.canary_users >= 1, "audit.canary-users", "must be >= 1")


@dataclass(frozen=True)
class ABConfig:
    """Federated A/B test of the personal vs the global model (see ``common/ab.py``)."""

    interactions: int = 4
    simulate_ratings: bool = True

    def __post_init__(self) -> None:
        _require(0 <= self.interactions <= 64, "ab.interactions", "must be in [0, 64]")


@dataclass(frozen=True)
class EvalConfig:
    """Device-side evaluation beyond the held-out losses every device reports.

    ``local_only``: also report the loss of the model the user could have trained alone — a LoRA
    of the same size, on the same examples, with the same optimizer steps and tokens as the
    device spent (see ``client/federation/baseline.py``). On in the simulation presets; a real
    device computes it only if its node config also says ``local-only-baseline=true``.
    """

    local_only: bool = False
    # Devices add their held-out losses of the model each round starts from to that round's
    # SecAgg+ sum (common/loss_sums.py): the server learns the cohort's mean, never one
    # device's, from devices whose owners do not share per-device losses (policy
    # share-losses). Gaussian noise shares only (not skellam).
    secure_sums: bool = False


@dataclass(frozen=True)
class ServerConfig:
    """The server's step along each released mean change (see ``server/optimizer.py``)."""

    optimizer: str = "sgd"
    learning_rate: float = 1.0
    momentum: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        _require(
            self.optimizer in SERVER_OPTIMIZERS,
            "server.optimizer",
            f"must be one of {', '.join(SERVER_OPTIMIZERS)}; got {self.optimizer!r}",
        )
        _require(
            0 < self.learning_rate <= 100,
            "server.learning-rate",
            f"must be in (0, 100], got {self.learning_rate}",
        )
        _require(
            0 <= self.momentum < 1, "server.momentum", f"must be in [0, 1), got {self.momentum}"
        )
        _require(0 <= self.beta2 < 1, "server.beta2", f"must be in [0, 1), got {self.beta2}")
        _require(self.tau > 0, "server.tau", f"must be > 0, got {self.tau}")


# Ray's own resource names, which have their own keys (simulation.client-cpus, …).
_RAY_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


def parse_resources(text: str) -> dict[str, float]:
    """Custom Ray resources from ``"name=amount,…"`` (``""``: none).

    Raises:
        ValueError: An item without ``=``, an empty or built-in name, a repeated name, or an
            amount that is not a finite number > 0.
    """
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, amount = (x.strip() for x in item.partition("="))
        if not sep or not name:
            raise ValueError(f"{item!r} is not name=amount")
        if name in _RAY_BUILTIN_RESOURCES or name in out:
            raise ValueError(
                f"{name!r} is built in or repeated (CPUs, GPUs and memory have their own keys)"
            )
        try:
            value = float(amount)
        except ValueError:
            raise ValueError(f"{item!r}: {amount!r} is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{item!r}: the amount must be a finite number > 0")
        out[name] = value
    return out


@dataclass(frozen=True)
class RunConfig:
    """Everything one federated run needs, parsed from ``context.run_config``."""

    num_server_rounds: int = 3
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    sampling: str = "fixed"
    evaluate_every: int = 1
    round_timeout: float = 3600.0
    seed: int = 42
    strategy: str = field(default="blend", metadata={"key": "personalization.strategy"})
    personalization: PersonalizationConfig = field(default_factory=PersonalizationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    ab: ABConfig = field(default_factory=ABConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = field(default="", metadata={"key": "output.dir"})
    run_name: str = field(default="", metadata={"key": "output.run-name"})
    device_root: str = field(default="", metadata={"key": "simulation.device-root"})
    users_per_node: int = field(default=1, metadata={"key": "simulation.users-per-node"})
    # What each simulated node's ClientApp asks of Ray (simulations/cluster.py).
    client_cpus: float = field(default=1.0, metadata={"key": "simulation.client-cpus"})
    client_gpus: float = field(default=0.0, metadata={"key": "simulation.client-gpus"})
    client_memory_mb: int = field(default=0, metadata={"key": "simulation.client-memory-mb"})
    client_resources: str = field(default="", metadata={"key": "simulation.client-resources"})
    server: ServerConfig = field(default_factory=ServerConfig)
    resume: bool = True

    def __post_init__(self) -> None:
        _require(
            self.num_server_rounds >= 1,
            "num-server-rounds",
            f"must be >= 1, got {self.num_server_rounds}",
        )
        for key, value in (
            ("fraction-train", self.fraction_train),
            ("fraction-evaluate", self.fraction_evaluate),
        ):
            _require(0.0 < value <= 1.0, key, f"must be in (0, 1], got {value}")
        _require(self.round_timeout > 0, "round-timeout", "must be > 0 seconds")
        _require(
            self.sampling in SAMPLINGS,
            "sampling",
            f"must be one of {', '.join(SAMPLINGS)}; got {self.sampling!r}",
        )
        _require(
            self.evaluate_every >= 0,
            "evaluate-every",
            f"must be >= 0 (0 = after the last round only), got {self.evaluate_every}",
        )
        targets = self.personalization.global_target_names() or ()
        _require(
            set(targets) <= set(self.model.lora_targets),
            "personalization.global-targets",
            f"must be among model.lora-targets ({', '.join(self.model.lora_targets)}); "
            f"got {self.personalization.global_targets!r}",
        )
        _require(
            self.users_per_node >= 1,
            "simulation.users-per-node",
            f"must be >= 1, got {self.users_per_node}",
        )
        self._check_canary_clients()
        self._check_client_resources()
        if self.users_per_node > 1:
            # A node hosting several simulated users samples each of them itself (Poisson)
            # and sends their mean update weighted by their count.
            _require(
                self.sampling == "poisson" or self.fraction_train == 1.0,
                "simulation.users-per-node",
                '> 1 needs sampling = "poisson" (each hosted user is sampled on its own)',
            )
            _require(
                self.dp.clip_norm > 0 or self.secagg.enabled,
                "simulation.users-per-node",
                "> 1 needs per-user weights: dp.clip-norm > 0 or SecAgg+",
            )
            _require(
                self.dp.min_clients > 0 or not self.dp.adds_noise,
                "simulation.users-per-node",
                "> 1 needs dp.min-clients (m_min, counted in users) when noise is added",
            )
            _require(self.data.num_users > 0, "data.num-users", "must be set with users per node")
        _require(
            not self.dp.distributed or self.secagg.enabled,
            "dp.noise-mode",
            f'"{self.dp.noise_mode}" needs secagg.enabled = true: unmasked, the server would see '
            'each update with only its share of the noise (use "central", which trusts the '
            "server)",
        )
        _require(
            not self.eval.secure_sums or (self.secagg.enabled and not self.dp.discrete),
            "eval.secure-sums",
            "needs secagg.enabled = true and a noise mode other than skellam (the losses ride "
            "in the masked vector beside the real-valued update)",
        )
        _require(
            self.personalization.update == "change" or not self.dp.local_enabled,
            "personalization.update",
            '"gradient" needs dp.local.enabled = false: DP-SGD\'s per-example clipped, noised '
            "gradients are not this round's gradients",
        )
        _require(
            self.strategy in STRATEGIES,
            "personalization.strategy",
            f"must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}",
        )

    def _check_client_resources(self) -> None:
        """What a simulated node asks of Ray: a CPU share, GPUs, memory, custom resources."""
        _require(
            self.client_cpus > 0, "simulation.client-cpus", f"must be > 0, got {self.client_cpus}"
        )
        _require(
            self.client_gpus >= 0, "simulation.client-gpus", f"must be >= 0, got {self.client_gpus}"
        )
        _require(
            self.client_memory_mb >= 0,
            "simulation.client-memory-mb",
            f"must be >= 0 (0 = not reserved), got {self.client_memory_mb}",
        )
        try:
            parse_resources(self.client_resources)
        except ValueError as err:
            raise ValueError(f"invalid run config `simulation.client-resources`: {err}") from None

    def _check_canary_clients(self) -> None:
        """The audit's canary clients are hosted simulation clients, beside >= 2 users."""
        k = self.audit.canary_clients
        _require(
            k == 0 or self.users_per_node > 1,
            "audit.canary-clients",
            "needs simulation.users-per-node > 1 (canary clients are hosted by simulation nodes)",
        )
        _require(
            k == 0 or k < self.data.num_users - 1,
            "audit.canary-clients",
            "must leave at least 2 of data.num-users with data",
        )

    def m_min(self, num_nodes: int) -> int:
        """The fewest updates the server accepts for a round: ``dp.min-clients`` when set,
        else every client it samples per round (at least 2)."""
        if self.dp.min_clients > 0:
            return self.dp.min_clients
        return max(2, int(num_nodes * self.fraction_train))

    def honest_cohort(self, num_nodes: int) -> int:
        """The honest devices each device's noise share is sized for: ``⌊h·m_min⌋`` (at least
        1), h = ``dp.honest-fraction``."""
        return max(1, math.floor(self.dp.honest_fraction * self.m_min(num_nodes) + 1e-9))

    def run_dir(self, run_id: int) -> Path:
        """Where this run's outputs go: ``<output.dir>/<output.run-name>``.

        Defaults: ``$FEDPERSONA_RUNS_DIR`` (``fedpersona server start`` sets it to its
        federation folder's ``runs/``), else ``$FEDPERSONA_HOME/runs`` (``~/.fedpersona/runs``);
        and ``run-<run_id>``.
        """
        root = (
            self.output_dir
            or os.environ.get(RUNS_DIR_ENV)
            or os.path.join(
                os.environ.get("FEDPERSONA_HOME", os.path.expanduser("~/.fedpersona")), "runs"
            )
        )
        return Path(root).expanduser() / (self.run_name or f"run-{run_id}")

    def simulated_device_dir(self, run_id: int, user: str) -> Path:
        """State dir of a simulated device that has no ``data-dir`` in its node config."""
        root = Path(self.device_root) if self.device_root else self.run_dir(run_id) / "devices"
        return root / user

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view of the config (for ``summary.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict` (e.g. the ``config`` of a run's ``summary.json``)."""
        groups = {
            "personalization": PersonalizationConfig,
            "model": ModelConfig,
            "data": DataConfig,
            "train": TrainConfig,
            "dp": DPConfig,
            "secagg": SecAggConfig,
            "privacy": PrivacyConfig,
            "audit": AuditConfig,
            "ab": ABConfig,
            "eval": EvalConfig,
            "server": ServerConfig,
        }
        kwargs: dict[str, Any] = {}
        data = dict(data)
        if "server_learning_rate" in data:  # a summary written before server.optimizer
            data["server"] = {"learning_rate": data.pop("server_learning_rate")}
        for key, value in data.items():
            if key in groups:
                group = dict(value)
                if key == "model":
                    group["lora_targets"] = tuple(group["lora_targets"])
                kwargs[key] = groups[key](**group)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def to_flat(self) -> dict[str, Any]:
        """The config as Flower's flat run config (inverse of :func:`parse_run_config`)."""
        out: dict[str, Any] = {}
        for key, (path, _) in _KEYS.items():
            value: Any = self
            for attr in path.split("."):
                value = getattr(value, attr)
            out[key] = ",".join(value) if isinstance(value, tuple) else value
        return out


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"expected true or false, got {value!r}")


def _split_list(value: Any) -> tuple[str, ...]:
    return tuple(t.strip() for t in str(value).split(",") if t.strip())


_CONVERTERS: dict[Any, Any] = {
    int: int,
    float: float,
    str: str,
    bool: _bool,
    tuple[str, ...]: _split_list,
}


def _derive_keys() -> dict[str, tuple[str, Any]]:
    """Flat run-config key -> (dataclass path, converter), read off the dataclasses: a field
    ``lora_r`` of the ``model`` group is ``model.lora-r``, unless its metadata names its key.
    The dataclasses are the one list of what a run config holds; ``pyproject.toml`` gives
    the same defaults (tests/test_config.py checks that they agree)."""
    keys: dict[str, tuple[str, Any]] = {}
    hints = get_type_hints(RunConfig)
    for f in fields(RunConfig):
        kind = hints[f.name]
        if is_dataclass(kind):
            inner = get_type_hints(kind)
            for g in fields(kind):
                key = g.metadata.get("key", f"{f.name}.{g.name.replace('_', '-')}")
                keys[key] = (f"{f.name}.{g.name}", _CONVERTERS[inner[g.name]])
        else:
            key = f.metadata.get("key", f.name.replace("_", "-"))
            keys[key] = (f.name, _CONVERTERS[kind])
    return keys


_KEYS = _derive_keys()


def parse_run_config(run_config: dict[str, Any]) -> RunConfig:
    """Parse Flower's flat run config into a validated :class:`RunConfig`.

    Args:
        run_config: ``context.run_config`` (keys like ``"model.lora-r"``).

    Returns:
        The frozen, validated configuration.

    Raises:
        ValueError: On an unknown key, a value of the wrong type, or an out-of-range value;
            the message names the key.
    """
    top: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {
        "personalization": {},
        "model": {},
        "data": {},
        "train": {},
        "dp": {},
        "secagg": {},
        "privacy": {},
        "audit": {},
        "ab": {},
        "eval": {},
        "server": {},
    }
    for key, raw in run_config.items():
        if key not in _KEYS:
            raise ValueError(
                f"unknown run config key `{key}`; known keys: {', '.join(sorted(_KEYS))}"
            )
        path, convert = _KEYS[key]
        if isinstance(raw, bool) and convert is not _bool:
            raise ValueError(f"invalid run config `{key}`: expected a number, got {raw!r}")
        try:
            value = convert(raw)
        except (TypeError, ValueError) as err:
            raise ValueError(f"invalid run config `{key}`: cannot parse {raw!r} ({err})") from err
        if "." in path:
            group, attr = path.split(".", 1)
            groups[group][attr] = value
        else:
            top[path] = value
    return RunConfig(
        personalization=PersonalizationConfig(**groups["personalization"]),
        model=ModelConfig(**groups["model"]),
        data=DataConfig(**groups["data"]),
        train=TrainConfig(**groups["train"]),
        dp=DPConfig(**groups["dp"]),
        secagg=SecAggConfig(**groups["secagg"]),
        privacy=PrivacyConfig(**groups["privacy"]),
        audit=AuditConfig(**groups["audit"]),
        ab=ABConfig(**groups["ab"]),
        eval=EvalConfig(**groups["eval"]),
        server=ServerConfig(**groups["server"]),
        **top,
    )


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` overrides (``--set``, of a run config or a profile); values are
    TOML literals (``3``, ``0.5``, ``true``, ``"a b"``), else plain strings.

    Raises:
        ValueError: If an item has no ``=`` or an empty key.
    """
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw.strip()
    return out
