"""Typed, validated experiment configuration shared by the ServerApp, ClientApp and Hydra.

Flower carries configuration as a flat ``run_config`` of scalars with dotted keys
(``"privacy.target_epsilon"``); Hydra composes nested groups. Both meet here: every
section is a frozen dataclass validated on construction, so a bad value stops the run
before any training, with a message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fedmer import registry
from fedmer.errors import ConfigError

__all__ = [
    "ALL_MODALITIES",
    "DEFAULT_GRAD_SAMPLE_MODE",
    "GRAD_SAMPLE_MODES",
    "MODALITIES",
    "RUNTIMES",
    "SCENARIOS",
    "STANDARDIZE",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "FederationConfig",
    "ModelConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "StrategyConfig",
    "run_config_keys",
    "unknown_keys_error",
]

#: Every modality FedMER knows, in the fixed order used by masks and packed tensors.
#: The sensor layout of the synthetic scenarios (and of Stress-Predict, which records physio only).
MODALITIES: tuple[str, ...] = ("speech", "face", "physio", "can")
#: Every modality any dataset may carry, in canonical order.
ALL_MODALITIES: tuple[str, ...] = (*MODALITIES, "text")
SCENARIOS: tuple[str, ...] = ("driving", "clinic")
AUDIO_FRONTENDS: tuple[str, ...] = ("logmel", "mfcc", "egemaps")
#: RAVDESS face features (probabilities and intensities in [0, 1]): as given, or on the log-odds scale.
FACE_TRANSFORMS: tuple[str, ...] = ("none", "logodds")
#: RAVDESS face columns: all 56 per-clip numbers, or the 28 per-clip means (no within-clip stds).
FACE_FEATURE_SETS: tuple[str, ...] = ("all", "means")
TEXT_ENCODERS: tuple[str, ...] = ("tokens", "minilm")
#: Input standardisation: none; per-feature mean/std from the clients' (DP) sums; or exact
#: statistics of calibration persons the server holds (public: never a client's data).
STANDARDIZE: tuple[str, ...] = ("none", "federated", "calibration")
PARTITION_SCHEMES: tuple[str, ...] = ("site", "dirichlet")
PRIVACY_MODES: tuple[str, ...] = ("sample", "client", "both", "off")
CLIENT_CLIPPINGS: tuple[str, ...] = ("fixed", "adaptive")
CLIPPING_SIDES: tuple[str, ...] = ("server", "client")
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
#: ``privacy.recipe``: the configured local batch/epochs/lr, or a DP-aware one chosen per client
#: (fedmer.privacy.recipe).
RECIPES: tuple[str, ...] = ("manual", "auto")
#: ``model.prior``: the model's starting weights as drawn, or from public knowledge (fedmer.models.prior).
MODEL_PRIORS: tuple[str, ...] = ("none", "face_expressions")
#: ``privacy.grad_sample_mode``: how DP-SGD gets each sample's clipped gradient: "bk" (FedMER's
#: book-keeping: per-sample norms from layer inputs and output gradients, fedmer.privacy.bk_dpsgd)
#: or one of Opacus' per-sample-gradient modes; all train every model family here to the same
#: update (tests/unit/test_grad_sample_mode.py). Not "ghost": it needs Opacus' own criterion
#: wrapper and was measured slower (docs/performance.md).
GRAD_SAMPLE_MODES: tuple[str, ...] = ("bk", "hooks", "ew", "functorch")
#: ``privacy.reply_metrics``: what a training reply carries besides the clipped arrays (README,
#: "What leaves a node"). minimal: the privacy statement only, no exact statistic of the node's
#: data; monitoring: also sample count, loss and pre-clipping norm (declared, not accounted);
#: auto: minimal under any DP (plus what the chosen strategy needs), monitoring without DP.
REPLY_METRICS: tuple[str, ...] = ("auto", "minimal", "monitoring")
#: Book-keeping: the same update as hooks, the fastest DP-SGD step here (bench.dp_step).
DEFAULT_GRAD_SAMPLE_MODE = "bk"
# Dataset, encoder, fusion, auxiliary-loss and strategy names are whatever fedmer.registry holds.
#: Sentinel used in the flat run_config for "derive the noise from the target epsilon".
AUTO = "auto"


def _fail(key: str, value: object, allowed: str) -> None:
    raise ConfigError(f"invalid {key}={value!r}: {allowed}")


def _is_number(value: object) -> bool:
    """An int or float, not a bool (``True`` is an int to Python, never a rate or a count here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(key, value, f"expected one of {', '.join(allowed)}")


def _positive(key: str, value: float, *, integer: bool = False, allow_inf: bool = False) -> None:
    """A number > 0; infinity only where it means something (a cap of inf = no cap).

    An infinite clip norm, learning rate or noise can only produce non-finite training, so
    it is refused here, before anything runs, rather than found as a NaN model afterwards.
    """
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        _fail(key, value, "expected a positive integer")
    if not _is_number(value) or not value > 0 or math.isnan(value):
        _fail(key, value, "expected a number > 0")
    if math.isinf(value) and not allow_inf:
        _fail(key, value, "expected a finite number > 0 (inf can only make training non-finite)")


def _non_negative(key: str, value: float) -> None:
    """A finite number >= 0."""
    if not _is_number(value) or not 0 <= value < math.inf:
        _fail(key, value, "expected a finite number >= 0")


def _fraction(key: str, value: float, *, low_open: bool = True) -> None:
    ok = _is_number(value) and ((0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0))
    if not ok:
        _fail(key, value, "expected a fraction in (0, 1]" if low_open else "expected [0, 1]")


def _below(key: str, value: float, high: float) -> None:
    """A number in [0, high) (nan is in no interval)."""
    if not (_is_number(value) and 0.0 <= value < high):
        _fail(key, value, f"expected [0, {high:g})")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, and for the synthetic one, how large and which scenario."""

    name: str = "synthetic"
    scenario: str = "driving"
    persons_per_site: int = 8
    test_persons_per_site: int = 1
    #: Synthetic: the server's held-out persons come from the first this-many sites (all when fewer),
    #: so the evaluation set has a fixed size however many clients the federation has.
    test_sites: int = 10
    sequences_per_person: int = 80
    seq_len: int = 20
    modalities: str = "all"
    root: str = "../shared/data"  # real datasets: folder holding ravdess/, stress-predict/, meld/
    audio_frontend: str = "logmel"  # RAVDESS speech features: log-mel or MFCC frames, or openSMILE eGeMAPS
    #: RAVDESS: scale each clip to a fixed RMS before the front-end, so a site's gain does not move it
    audio_level_norm: bool = True
    text_encoder: str = "tokens"  # MELD: trainable token embeddings, or pretrained MiniLM sentence vectors
    complete_only: bool = False  # RAVDESS: only the 360 clips with a face, whichever modalities are selected
    face_transform: str = "none"  # RAVDESS: logodds maps each face number q to log((q+.01)/(1.01-q))
    face_features: str = "all"  # RAVDESS: all 56 face numbers, or "means": the 28 per-clip means
    standardize: str = "none"  # federated: per-feature mean/std from every client's sums before round 1
    #: data.standardize=calibration: the training persons of this many more sites (after the
    #: clients' sites) are the server's own calibration recordings: public, never a client.
    calibration_sites: int = 0

    def __post_init__(self) -> None:
        registry.DATASETS.check(self.name)
        _choice("data.standardize", self.standardize, STANDARDIZE)
        c = self.calibration_sites
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            _fail("data.calibration_sites", c, "expected an integer >= 0 (sites held by the server)")
        if self.standardize == "calibration" and c < 1:
            _fail(
                "data.calibration_sites",
                c,
                "data.standardize=calibration takes its statistics from calibration sites the server "
                "holds; set data.calibration_sites to at least 1",
            )
        if c > 0 and self.standardize != "calibration":
            _fail(
                "data.calibration_sites",
                c,
                f"calibration sites are only used by data.standardize=calibration (here "
                f"{self.standardize!r}): set data.calibration_sites=0, or data.standardize=calibration",
            )
        _choice("data.audio_frontend", self.audio_frontend, AUDIO_FRONTENDS)
        _choice("data.text_encoder", self.text_encoder, TEXT_ENCODERS)
        _choice("data.face_transform", self.face_transform, FACE_TRANSFORMS)
        _choice("data.face_features", self.face_features, FACE_FEATURE_SETS)
        if self.face_features != "all" and self.name != "ravdess":
            _fail(
                "data.face_features",
                self.face_features,
                f"only RAVDESS has face features; data.name={self.name} has none, so set it to all",
            )
        if self.face_transform != "none" and self.name != "ravdess":
            _fail(
                "data.face_transform",
                self.face_transform,
                f"only RAVDESS has face features; data.name={self.name} has none, so set it to none",
            )
        if not isinstance(self.audio_level_norm, bool):
            _fail("data.audio_level_norm", self.audio_level_norm, "expected true or false")
        if not isinstance(self.complete_only, bool):
            _fail("data.complete_only", self.complete_only, "expected true or false")
        if self.complete_only and self.name != "ravdess":
            _fail(
                "data.complete_only",
                self.complete_only,
                f"only RAVDESS has clips without a modality to drop (its 360 with a face); data.name="
                f"{self.name} records every selected modality in every sample, so set it to false",
            )
        _choice("data.scenario", self.scenario, SCENARIOS)
        _positive("data.persons_per_site", self.persons_per_site, integer=True)
        _positive("data.test_persons_per_site", self.test_persons_per_site, integer=True)
        _positive("data.test_sites", self.test_sites, integer=True)
        _positive("data.sequences_per_person", self.sequences_per_person, integer=True)
        _positive("data.seq_len", self.seq_len, integer=True)
        if self.seq_len < 4:
            _fail("data.seq_len", self.seq_len, "expected at least 4 frames")
        _ = self.modality_list  # validates the modality names

    @property
    def modality_list(self) -> tuple[str, ...]:
        """The modalities this run uses, in the dataset's canonical order."""
        offered: tuple[str, ...] = registry.DATASETS.meta(self.name)["modalities"]
        if self.modalities == "all":
            return offered
        chosen = [m.strip() for m in self.modalities.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in offered]
        if not chosen or unknown:
            _fail(
                "data.modalities",
                self.modalities,
                f"expected 'all' or a comma-separated subset of {', '.join(offered)} (what data.name="
                f"{self.name} records)",
            )
        return tuple(m for m in offered if m in chosen)


@dataclass(frozen=True)
class PartitionConfig:
    """Who holds what: sites as clients, or label-skewed splits, plus missing sensors."""

    scheme: str = "site"
    alpha: float = 0.5
    modality_missing_rate: float = 0.0
    min_samples: int = 8

    def __post_init__(self) -> None:
        _choice("partition.scheme", self.scheme, PARTITION_SCHEMES)
        _positive("partition.alpha", self.alpha)
        _below("partition.modality_missing_rate", self.modality_missing_rate, 1.0)
        _positive("partition.min_samples", self.min_samples, integer=True)


@dataclass(frozen=True)
class ModelConfig:
    """Per-modality temporal encoders and how their embeddings are fused."""

    encoder: str = "tcn"
    fusion: str = "attention"
    hidden: int = 32
    aux_loss: str = "none"  # cross-modal auxiliary objective: CCA-style alignment or contrastive
    aux_weight: float = 0.1
    intensity_weight: float = 0.0  # > 0: a second head predicts emotion intensity (datasets that label it)
    modality_dropout: float = 0.0  # training only: each present modality of a sample dropped w.p. this
    prior: str = "none"  # face_expressions: the linear face encoder starts as the face recogniser

    def __post_init__(self) -> None:
        _choice("model.prior", self.prior, MODEL_PRIORS)
        registry.ENCODERS.check(self.encoder)
        registry.FUSIONS.check(self.fusion)
        _positive("model.hidden", self.hidden, integer=True)
        registry.AUX_LOSSES.check(self.aux_loss)
        _non_negative("model.aux_weight", self.aux_weight)
        _non_negative("model.intensity_weight", self.intensity_weight)
        _below("model.modality_dropout", self.modality_dropout, 1.0)


#: The smallest target epsilon a run accepts (see PrivacyConfig validation).
MIN_TARGET_EPSILON = 0.01


@dataclass(frozen=True)
class PrivacyConfig:
    """Which unit DP protects (one sample, one whole client, or both) and how strongly.

    ``noise_multiplier=None`` ("auto") means: derive the DP-SGD noise from ``target_epsilon``
    for the whole planned run (every round, as if the client were sampled each time), so the
    cumulative epsilon never exceeds the target. ``client_noise_multiplier=None`` does the same
    for the client-level noise, over ``num_rounds`` releases without sampling amplification.
    ``target_epsilon=inf`` with auto noise means noise 0: the same pipeline, clipping only,
    reported as epsilon = inf (the right end of a privacy/accuracy frontier).
    """

    mode: str = "sample"
    target_epsilon: float = 8.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    update_clip_norm: float = 5.0
    accountant: str = "rdp"
    budget_cap: float = math.inf  # a node refuses a round that would take its ledger past this epsilon
    client_noise_multiplier: float | None = 1.0  # client-level DP noise on the aggregate; None = "auto"
    client_clipping: str = "fixed"
    client_clipping_side: str = "server"
    stats_clip_norm: float = 20.0  # data.standardize=federated under DP-SGD: L2 bound of a sample's stats
    stats_epsilon_fraction: float = 0.1  # share of target_epsilon the stats release may spend alone
    recipe: str = "auto"  # batch, local steps and lr chosen per client for DP-SGD; manual: as configured
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE  # how per-sample clipping runs: speed, not privacy
    reply_metrics: str = AUTO  # what leaves a node besides the clipped update (REPLY_METRICS)

    @property
    def sample_level(self) -> bool:
        """DP-SGD inside each client (protects one sample)."""
        return self.mode in ("sample", "both")

    @property
    def client_level(self) -> bool:
        """Flower's DP wrapper around the strategy (protects one whole client)."""
        return self.mode in ("client", "both")

    @property
    def minimal_replies(self) -> bool:
        """Training replies carry no exact statistic of the node's data (``reply_metrics``)."""
        return self.reply_metrics == "minimal" or (self.reply_metrics == AUTO and self.mode != "off")

    def __post_init__(self) -> None:
        _choice("privacy.mode", self.mode, PRIVACY_MODES)
        _choice("privacy.reply_metrics", self.reply_metrics, REPLY_METRICS)
        _choice("privacy.accountant", self.accountant, ACCOUNTANTS)
        _choice("privacy.recipe", self.recipe, RECIPES)
        _choice("privacy.grad_sample_mode", self.grad_sample_mode, GRAD_SAMPLE_MODES)
        if not (_is_number(self.target_epsilon) and self.target_epsilon > 0):
            _fail("privacy.target_epsilon", self.target_epsilon, "expected a number > 0")
        if self.target_epsilon < MIN_TARGET_EPSILON:
            _fail(
                "privacy.target_epsilon",
                self.target_epsilon,
                f"expected >= {MIN_TARGET_EPSILON:g}: below that the noise a run needs is beyond "
                "Opacus' search (sigma <= 1e6) or drowns every update, and the run would fail "
                "minutes later inside Opacus",
            )
        if not (_is_number(self.delta) and 0.0 < self.delta < 1.0):
            _fail("privacy.delta", self.delta, "expected a number in the open interval (0, 1)")
        if self.noise_multiplier is not None and not (
            _is_number(self.noise_multiplier) and 0 <= self.noise_multiplier < math.inf
        ):
            _fail(
                "privacy.noise_multiplier",
                self.noise_multiplier,
                f"expected '{AUTO}' or a finite number >= 0",
            )
        _positive("privacy.max_grad_norm", self.max_grad_norm)
        _positive("privacy.update_clip_norm", self.update_clip_norm)
        _positive("privacy.budget_cap", self.budget_cap, allow_inf=True)
        _choice("privacy.client_clipping", self.client_clipping, CLIENT_CLIPPINGS)
        _choice("privacy.client_clipping_side", self.client_clipping_side, CLIPPING_SIDES)
        _positive("privacy.stats_clip_norm", self.stats_clip_norm)
        fraction = self.stats_epsilon_fraction
        if not (_is_number(fraction) and 0 < fraction < 1):
            _fail("privacy.stats_epsilon_fraction", fraction, "expected a fraction in (0, 1)")
        if self.client_level and self.client_noise_multiplier is None:
            if self.client_clipping == "adaptive":
                _fail(
                    "privacy.client_noise_multiplier",
                    AUTO,
                    "deriving the noise from privacy.target_epsilon needs an accountant, which Flower "
                    "has only for privacy.client_clipping=fixed; give a number for adaptive clipping",
                )
        elif self.client_level and self.client_noise_multiplier is not None:  # None handled above
            _positive("privacy.client_noise_multiplier", self.client_noise_multiplier)
        elif self.client_noise_multiplier is not None:  # unused in this mode, but never nonsense
            _non_negative("privacy.client_noise_multiplier", self.client_noise_multiplier)


@dataclass(frozen=True)
class StrategyConfig:
    """The server-side aggregation rule and its own knobs (ignored where not used)."""

    name: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.1
    server_momentum: float = 0.9
    tau: float = 1e-3
    trim_beta: float = 0.2
    num_malicious: int = 0

    def __post_init__(self) -> None:
        registry.STRATEGIES.check(self.name)
        _non_negative("strategy.proximal_mu", self.proximal_mu)
        _positive("strategy.server_lr", self.server_lr)
        _below("strategy.server_momentum", self.server_momentum, 1.0)
        _positive("strategy.tau", self.tau)
        _below("strategy.trim_beta", self.trim_beta, 0.5)
        if (
            isinstance(self.num_malicious, bool)
            or not isinstance(self.num_malicious, int)
            or self.num_malicious < 0
        ):
            _fail("strategy.num_malicious", self.num_malicious, "expected an integer >= 0")


#: Simulation runtimes (``federation.runtime``): ``ray`` is Flower's Simulation Runtime, clients on
#: Ray actors side by side (``client_cpus`` each); ``inprocess`` runs every ClientApp call in the
#: run's own process, one after another (no Ray start-up: for sweeps that run jobs side by side).
RUNTIMES = ("ray", "inprocess")


@dataclass(frozen=True)
class FederationConfig:
    """Clients, rounds, sampling and the local training recipe."""

    num_clients: int = 10
    num_rounds: int = 20
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_train_clients: int = 2
    local_epochs: int = 2
    batch_size: int = 128
    lr: float = 0.1
    client_cpus: float = 1.0
    #: How a simulation runs its clients (``RUNTIMES``); a deployment ignores it.
    runtime: str = "ray"
    max_failed_fraction: float = 0.5  # a run whose share of failed or rejected trainings exceeds this fails
    #: Nodes that must be connected before a round samples (0: all ``num_clients``). A deployment
    #: sets it below ``num_clients`` so a dead node does not stall every later round.
    min_available_clients: int = 0
    #: Seconds a round waits for replies; a node that has not answered by then counts as failed.
    round_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        _positive("federation.num_clients", self.num_clients, integer=True)
        if (
            isinstance(self.min_available_clients, bool)
            or not isinstance(self.min_available_clients, int)
            or not (0 <= self.min_available_clients <= self.num_clients)
        ):
            _fail(
                "federation.min_available_clients",
                self.min_available_clients,
                f"expected an integer in 0..federation.num_clients={self.num_clients} (0: all of them)",
            )
        _positive("federation.round_timeout_s", self.round_timeout_s)
        _positive("federation.num_rounds", self.num_rounds, integer=True)
        _fraction("federation.fraction_train", self.fraction_train)
        _fraction("federation.fraction_evaluate", self.fraction_evaluate, low_open=False)
        _positive("federation.min_train_clients", self.min_train_clients, integer=True)
        _positive("federation.local_epochs", self.local_epochs, integer=True)
        _positive("federation.batch_size", self.batch_size, integer=True)
        _positive("federation.lr", self.lr)
        _positive("federation.client_cpus", self.client_cpus)
        _choice("federation.runtime", self.runtime, RUNTIMES)
        _fraction("federation.max_failed_fraction", self.max_failed_fraction, low_open=False)

    @property
    def clients_per_round(self) -> int:
        """How many clients Flower's strategies sample each round (their own rule)."""
        return max(int(self.num_clients * self.fraction_train), self.min_train_clients)


#: What a simulated fault does to a sampled client (``faults.failure_mode``).
FAILURE_MODES = ("raise", "timeout", "dropout")
#: What an attacker sends (``faults.attack``); ``none`` = honest.
ATTACKS = ("none", "sign_flip", "scale", "noise", "nan", "label_flip")


@dataclass(frozen=True)
class FaultsConfig:
    """Simulated faults and attackers, switched on for robustness experiments (off by default).

    Each round, ``failure_rate`` of the partitions (a seeded choice per round) fail when sampled:
    they raise, reply after ``delay_s`` (``timeout``: later than a
    ``federation.round_timeout_s`` set below it) or drop out. A fixed, seeded set of
    ``attacker_fraction`` of the partitions attacks whenever sampled; ``attack_scale`` sets the
    attack's strength and, with ``within_bound``, a model attacker rescales its update to the
    clip bound C so the server's norm check cannot catch it by size alone.
    """

    failure_rate: float = 0.0
    failure_mode: str = "raise"
    delay_s: float = 30.0
    attack: str = "none"
    attacker_fraction: float = 0.0
    attack_scale: float = 1.0
    within_bound: bool = True

    def __post_init__(self) -> None:
        _fraction("faults.failure_rate", self.failure_rate, low_open=False)
        _choice("faults.failure_mode", self.failure_mode, FAILURE_MODES)
        _positive("faults.delay_s", self.delay_s)
        _choice("faults.attack", self.attack, ATTACKS)
        _fraction("faults.attacker_fraction", self.attacker_fraction, low_open=False)
        _positive("faults.attack_scale", self.attack_scale)
        if not isinstance(self.within_bound, bool):
            _fail("faults.within_bound", self.within_bound, "expected true or false")
        if (self.attack == "none") != (self.attacker_fraction == 0.0):
            _fail(
                "faults.attacker_fraction",
                self.attacker_fraction,
                f"faults.attack={self.attack} needs attacker_fraction > 0, and attack=none needs 0",
            )

    @property
    def active(self) -> bool:
        return self.failure_rate > 0 or self.attacker_fraction > 0


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "partition": PartitionConfig,
    "model": ModelConfig,
    "privacy": PrivacyConfig,
    "strategy": StrategyConfig,
    "federation": FederationConfig,
    "faults": FaultsConfig,
}


@dataclass(frozen=True)
class ExperimentConfig:
    """One whole run: every section plus the seed and where results go."""

    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    seed: int = 0
    output_dir: str = "outputs/flwr/{run_id}"
    #: An unfinished run folder to continue from its last checkpoint ("" starts a new run).
    resume: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            _fail("seed", self.seed, "expected an integer >= 0")
        fed = self.federation
        if fed.min_train_clients > fed.num_clients:
            _fail(
                "federation.min_train_clients",
                fed.min_train_clients,
                f"the strategy needs at least this many clients but federation.num_clients="
                f"{fed.num_clients}; lower it or add clients",
            )
        p = self.privacy
        strategy = registry.STRATEGIES.meta(self.strategy.name)
        if p.client_level and not strategy.get("client_dp", False):
            dp_able = [n for n in registry.STRATEGIES.names() if registry.STRATEGIES.meta(n).get("client_dp")]
            _fail(
                "strategy.name",
                self.strategy.name,
                f"client-level DP adds noise calibrated to a mean of clipped updates, so it needs "
                f"FedAvg's aggregation, optionally followed by a server optimizer "
                f"({', '.join(dp_able)}); robust aggregators (median, trimmed mean, krum, "
                "bulyan) are not means, so the noise would not bound their sensitivity",
            )
        if self.data.calibration_sites and self.partition.scheme != "site":
            _fail(
                "partition.scheme",
                self.partition.scheme,
                "data.calibration_sites holds whole sites back from the federation, which needs "
                "partition.scheme=site (one site per client)",
            )
        if p.client_level and self.data.standardize != "none":
            _fail(
                "data.standardize",
                self.data.standardize,
                "standardisation is supported with sample-level DP only: Flower's client-level "
                "wrappers would noise the statistics inside the model every round, and their "
                "accountant cannot compose the statistics release; use data.standardize=none with "
                "privacy.mode=client|both, or privacy.mode=sample|off",
            )
        if p.reply_metrics == "minimal" and strategy.get("modality_counts", False):
            _fail(
                "strategy.name",
                self.strategy.name,
                f"{self.strategy.name} weights each modality by every node's exact count of samples "
                "with it, which privacy.reply_metrics=minimal does not send; use reply_metrics=auto "
                "(sends the counts this strategy needs, declared, not accounted) or another strategy",
            )
        needed = int(strategy.get("min_clients", lambda f: 1)(self.strategy.num_malicious))
        if fed.clients_per_round < needed:
            _fail(
                "federation.num_clients",
                fed.num_clients,
                f"strategy {self.strategy.name} with strategy.num_malicious="
                f"{self.strategy.num_malicious} needs at least {needed} clients per round, "
                f"but this config samples {fed.clients_per_round} "
                "(num_clients x fraction_train, at least min_train_clients)",
            )

    # -- flat Flower run_config ------------------------------------------------------
    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flatten to Flower's scalar ``run_config`` with dotted keys."""
        flat: dict[str, bool | int | float | str] = {
            "seed": self.seed,
            "output.dir": self.output_dir,
            "resume": self.resume,
        }
        for name in _SECTIONS:
            for key, value in asdict(getattr(self, name)).items():
                flat[f"{name}.{key}"] = AUTO if value is None else value
        return flat

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], *, complete: bool = False) -> ExperimentConfig:
        """Build (and validate) from a flat run_config; unknown keys are an error.

        ``complete=True`` (what the Flower apps use) also rejects missing keys: Flower
        always fuses the pyproject defaults in, so a missing key means the app was
        started without its config, and silently using defaults would hide that.
        """
        known = run_config_keys()
        missing = sorted(known - set(run_config))
        if complete and missing:
            raise ConfigError(
                f"run_config lacks key(s) {', '.join(missing)}: run the app through `flwr run .` or "
                "`python -m simulations.run`, which supply [tool.flwr.app.config] from pyproject.toml"
            )
        if set(run_config) - known:
            raise unknown_keys_error(run_config, known)
        sections: dict[str, Any] = {}
        for name, section in _SECTIONS.items():
            kwargs = {}
            for f in fields(section):
                key = f"{name}.{f.name}"
                if key in run_config:
                    kwargs[f.name] = _coerce(key, run_config[key], f.type)
            sections[name] = section(**kwargs)
        extra: dict[str, Any] = {}
        if "seed" in run_config:
            extra["seed"] = _coerce("seed", run_config["seed"], "int")
        if "output.dir" in run_config:
            extra["output_dir"] = str(run_config["output.dir"])
        if "resume" in run_config:
            extra["resume"] = str(run_config["resume"])
        return cls(**sections, **extra)

    @classmethod
    def from_nested(cls, nested: Mapping[str, Any]) -> ExperimentConfig:
        """Build from a nested mapping (a resolved Hydra config)."""
        flat: dict[str, Any] = {}
        for key, value in nested.items():
            if key in _SECTIONS and isinstance(value, Mapping):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            elif key == "output" and isinstance(value, Mapping):
                flat.update({f"output.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        return cls.from_run_config(flat)


def run_config_keys() -> set[str]:
    """Every key of the flat run_config (what pyproject.toml's [tool.flwr.app.config] declares)."""
    return {"seed", "output.dir", "resume"} | {
        f"{name}.{f.name}" for name, section in _SECTIONS.items() for f in fields(section)
    }


def unknown_keys_error(config: Mapping[str, Any], known: Iterable[str] | None = None) -> ConfigError:
    """The error for the keys of ``config`` that are not ``known``: each with its value and the
    closest valid key (a typo), or the keys of a section given by its bare name (``strategy``)."""
    valid = sorted(run_config_keys() if known is None else known)
    parts = []
    for key in sorted(set(config) - set(valid)):
        part = f"{key}={config[key]!r}"
        in_section = [k for k in valid if k.startswith(f"{key}.")]
        close = _closest(key, valid)
        if in_section:
            part += f" (a section, not a key: set one of {', '.join(in_section)})"
        elif close:
            part += f" (did you mean {close}?)"
        parts.append(part)
    return ConfigError(f"unknown config key(s) {'; '.join(parts)}; valid keys are {', '.join(valid)}")


def _closest(key: str, valid: list[str]) -> str | None:
    """The valid key a typo most likely meant: a key of the same section whose name contains the
    typed one or is contained in it (``strategy.lr`` -> ``strategy.server_lr``), else the closest
    spelling."""
    section, _, name = key.partition(".")
    if name:
        same = [k for k in valid if k.startswith(f"{section}.")]
        hits = [k for k in same if name in k.partition(".")[2] or k.partition(".")[2] in name]
        if len(hits) == 1:
            return hits[0]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.75)
    return close[0] if close else None


#: How a type mismatch is explained, per dataclass field type.
_EXPECTED = {
    "float | None": f"expected a number or '{AUTO}'",
    "int": "expected an integer",
    "float": "expected a number",
    "bool": "expected true or false",
}


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    """Turn a run_config scalar into the dataclass field type, or fail naming the key.

    A bool is never a number here: Python's ``float(True)`` is 1.0, which would turn
    ``privacy.target_epsilon=true`` into epsilon 1 without a word.
    """
    type_name = str(type_name)
    try:
        if type_name in ("float | None", "float", "int") and isinstance(value, bool):
            raise ValueError
        if type_name == "float | None":
            return None if value in (AUTO, None) else float(value)
        if type_name == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if type_name == "float":
            return float(value)
        if type_name == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false"):
                return str(value).lower() == "true"
            raise ValueError
        if type_name == "str":
            return str(value)
    except (TypeError, ValueError, OverflowError):
        expected = _EXPECTED.get(type_name, f"expected a value of type {type_name}")
        raise ConfigError(f"invalid {key}={value!r}: {expected}") from None
    return value
