"""Build Flower's own strategies by name, and wrap them so no failure goes unseen.

The registry maps config names to factories over ``flwr.serverapp.strategy`` classes;
:class:`AccountedStrategy` wraps whichever is chosen. It (1) counts and surfaces
failed replies (Flower only logs them), stopping the run when a whole round fails,
(2) orders replies by partition id so aggregation is bit-reproducible whatever order
replies arrive in, and (3) keeps each round's per-client metrics (epsilon, update norm)
so the server can report max and mean epsilon, not only Flower's weighted mean.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as fs

from fedmer import records as rk
from fedmer.config import SERVER_OPTIMIZER_STRATEGIES, STRATEGIES, ConfigError, ExperimentConfig
from fedmer.grid import short_reason
from fedmer.privacy.client_level import wrap_client_level_dp
from fedmer.privacy.ledger import BUDGET_MARKER
from fedmer.privacy.server_optimizer import noised_server_optimizer

__all__ = ["STRATEGY_REGISTRY", "AccountedStrategy", "RoundReport", "build_strategy", "register_strategy"]

log = logging.getLogger(__name__)

#: ``(cfg, common kwargs, cls=None) -> strategy``; server optimizers honour ``cls`` (a subclass
#: of their Flower class) so client-level DP can slot a noised average under their step.
Factory = Callable[..., fs.Strategy]
STRATEGY_REGISTRY: dict[str, Factory] = {}


def register_strategy(name: str) -> Callable[[Factory], Factory]:
    """Add a strategy factory under ``name`` (what ``strategy.name`` selects)."""

    def deco(fn: Factory) -> Factory:
        STRATEGY_REGISTRY[name] = fn
        return fn

    return deco


@register_strategy("fedavg")
def _fedavg(cfg: ExperimentConfig, common: dict) -> fs.Strategy:
    return fs.FedAvg(**common)


@register_strategy("fedprox")
def _fedprox(cfg: ExperimentConfig, common: dict) -> fs.Strategy:
    return fs.FedProx(**common, proximal_mu=cfg.strategy.proximal_mu)


def _fedopt(base: type) -> Factory:
    def factory(cfg: ExperimentConfig, common: dict, cls: type | None = None) -> fs.Strategy:
        s = cfg.strategy
        return (cls or base)(**common, eta=s.server_lr, eta_l=cfg.federation.lr, tau=s.tau)

    return factory


register_strategy("fedadam")(_fedopt(fs.FedAdam))
register_strategy("fedyogi")(_fedopt(fs.FedYogi))
register_strategy("fedadagrad")(_fedopt(fs.FedAdagrad))


@register_strategy("fedavgm")
def _fedavgm(cfg: ExperimentConfig, common: dict, cls: type | None = None) -> fs.Strategy:
    s = cfg.strategy
    return (cls or fs.FedAvgM)(**common, server_learning_rate=s.server_lr, server_momentum=s.server_momentum)


@register_strategy("fedmedian")
def _fedmedian(cfg: ExperimentConfig, common: dict) -> fs.Strategy:
    return fs.FedMedian(**common)


@register_strategy("fedtrimmedavg")
def _fedtrimmedavg(cfg: ExperimentConfig, common: dict) -> fs.Strategy:
    return fs.FedTrimmedAvg(**common, beta=cfg.strategy.trim_beta)


@register_strategy("krum")
def _krum(cfg: ExperimentConfig, common: dict) -> fs.Strategy:
    return fs.Krum(**common, num_malicious_nodes=cfg.strategy.num_malicious)


@register_strategy("multikrum")
def _multikrum(cfg: ExperimentConfig, common: dict) -> fs.Strategy:
    select = max(1, cfg.federation.clients_per_round - cfg.strategy.num_malicious)
    return fs.MultiKrum(**common, num_malicious_nodes=cfg.strategy.num_malicious, num_nodes_to_select=select)


@register_strategy("bulyan")
def _bulyan(cfg: ExperimentConfig, common: dict) -> fs.Strategy:
    return fs.Bulyan(**common, num_malicious_nodes=cfg.strategy.num_malicious)


@dataclass
class RoundReport:
    """What one round's training replies said, client by client."""

    server_round: int
    sampled: int = 0
    failures: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)  # nodes whose privacy budget is spent
    clients: list[dict] = field(default_factory=list)  # one MetricRecord (as dict) per reply

    def epsilons(self) -> list[float]:
        return [float(c[rk.EPSILON]) for c in self.clients if rk.EPSILON in c]


class AccountedStrategy(fs.Strategy):
    """Delegate everything to a Flower strategy; record, order and police the replies."""

    def __init__(self, inner: fs.Strategy) -> None:
        self.inner = inner
        self.rounds: dict[int, RoundReport] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.rounds[server_round] = RoundReport(server_round, sampled=len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = _ordered(replies)
        report = self.rounds.setdefault(server_round, RoundReport(server_round))
        for msg in replies:
            if msg.has_error():
                text = msg.error.reason or f"error code {msg.error.code} without a reason"
                reason = f"node {msg.metadata.src_node_id}: {short_reason(text)}"
                (report.refusals if BUDGET_MARKER in text else report.failures).append(reason)
            else:
                report.clients.append(dict(msg.content[rk.METRICS]))
        if report.refusals:
            log.warning(
                "round %d: %d client(s) refused to train, their privacy budget is spent:\n  %s",
                server_round,
                len(report.refusals),
                "\n  ".join(report.refusals),
            )
        if report.failures:
            log.warning(
                "round %d: %d of %d clients failed:\n  %s",
                server_round,
                len(report.failures),
                len(replies),
                "\n  ".join(report.failures),
            )
        if replies and not report.clients:
            first = (report.failures or report.refusals)[0]
            raise RuntimeError(
                f"round {server_round}: no sampled client trained ({len(report.failures)} failed, "
                f"{len(report.refusals)} refused: budget spent); first: {first}"
            )
        if len(replies) < report.sampled:
            log.warning(
                "round %d: %d of %d sampled clients did not reply in time",
                server_round,
                report.sampled - len(replies),
                report.sampled,
            )
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, _ordered(replies))


def _ordered(replies: Iterable[Message]) -> list[Message]:
    """Replies sorted by partition id (errors last), so sums run in a fixed order."""

    def key(msg: Message) -> tuple[int, int]:
        if msg.has_error() or rk.METRICS not in msg.content:
            return (1, msg.metadata.src_node_id)
        return (0, int(msg.content[rk.METRICS].get(rk.PARTITION_ID, 0)))

    return sorted(replies, key=key)


def _metrics_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted means of numeric metrics, skipping infinite values (non-private epsilon)."""
    weights = [float(r[rk.METRICS][weight_key]) for r in records]
    total = sum(weights) or 1.0
    out: dict[str, float] = {}
    for name in records[0][rk.METRICS]:
        if name in (weight_key, rk.PARTITION_ID):
            continue
        vals = [float(r[rk.METRICS][name]) for r in records]
        out[name] = (
            sum(w * v for w, v in zip(weights, vals, strict=False)) / total
            if all(map(_finite, vals))
            else max(vals)
        )
    return MetricRecord(out)


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def build_strategy(cfg: ExperimentConfig) -> AccountedStrategy:
    """The configured Flower strategy, wrapped in :class:`AccountedStrategy`."""
    name = cfg.strategy.name
    if name not in STRATEGY_REGISTRY:
        raise ConfigError(
            f"invalid strategy.name={name!r}: expected one of {', '.join(sorted(STRATEGY_REGISTRY))}"
        )
    f = cfg.federation
    accounted = cfg.privacy.client_level and cfg.privacy.client_clipping == "fixed"
    common = {
        "weighted_by_key": rk.CLIENT_WEIGHT if accounted else rk.NUM_EXAMPLES,
        "fraction_train": f.fraction_train,
        "fraction_evaluate": f.fraction_evaluate,
        "min_train_nodes": f.min_train_clients,
        "min_evaluate_nodes": min(f.min_train_clients, f.num_clients) if f.fraction_evaluate > 0 else 0,
        "min_available_nodes": f.num_clients,
        "train_metrics_aggr_fn": _metrics_mean,
        "evaluate_metrics_aggr_fn": _metrics_mean,
    }
    factory = STRATEGY_REGISTRY[name]
    if cfg.privacy.client_level and name in SERVER_OPTIMIZER_STRATEGIES:
        # Noise the plain average first, then let the server optimizer post-process it.
        dp = wrap_client_level_dp(fs.FedAvg(**common), cfg)
        optimizer_cls = type(factory(cfg, common))
        return AccountedStrategy(
            noised_server_optimizer(optimizer_cls, dp, lambda cls: factory(cfg, common, cls))
        )
    strategy = factory(cfg, common)
    if cfg.privacy.client_level:
        strategy = wrap_client_level_dp(strategy, cfg)
    return AccountedStrategy(strategy)


assert set(STRATEGY_REGISTRY) == set(STRATEGIES), "config.STRATEGIES and the registry disagree"
