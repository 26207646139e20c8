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
import math
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, MetricRecordValues, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as fs

from fedmer import records as rk
from fedmer import registry
from fedmer.config import ExperimentConfig
from fedmer.federation.grid import short_reason
from fedmer.federation.guard import as_arrays, check_aggregate, check_reply
from fedmer.privacy.client_level import wrap_client_level_dp
from fedmer.privacy.ledger import BUDGET_MARKER
from fedmer.privacy.server_optimizer import noised_server_optimizer
from fedmer.results.rounds import RoundReport

__all__ = ["STRATEGY_REGISTRY", "AccountedStrategy", "build_strategy", "register_strategy"]

log = logging.getLogger(__name__)

#: ``(cfg, common kwargs, cls=None) -> strategy``; server optimizers honour ``cls`` (a subclass
#: of their Flower class) so client-level DP can slot a noised average under their step.
Factory = Callable[..., fs.Strategy]
STRATEGY_REGISTRY = registry.STRATEGIES


def register_strategy(
    name: str,
    *,
    client_dp: bool = False,
    server_optimizer: bool = False,
    min_clients: Callable[[int], int] = lambda num_malicious: 1,
    modality_counts: bool = False,
) -> Callable[[Factory], Factory]:
    """Add a strategy factory under ``name`` (what ``strategy.name`` selects).

    ``client_dp``: its aggregate is FedAvg's mean (optionally followed by a server optimizer
    step, ``server_optimizer``), so client-level DP can wrap it with an accounted epsilon.
    ``min_clients(num_malicious)``: replies per round it needs to tolerate that many attackers.
    ``modality_counts``: it asks every node for its exact sample count per modality.
    """
    return registry.STRATEGIES.register(
        name,
        client_dp=client_dp,
        server_optimizer=server_optimizer,
        min_clients=min_clients,
        modality_counts=modality_counts,
    )


@register_strategy("fedavg", client_dp=True)
def _fedavg(cfg: ExperimentConfig, common: dict) -> fs.Strategy:
    return fs.FedAvg(**common)


@register_strategy("fedprox", client_dp=True)
def _fedprox(cfg: ExperimentConfig, common: dict) -> fs.Strategy:
    return fs.FedProx(**common, proximal_mu=cfg.strategy.proximal_mu)


def _fedopt(base: type) -> Factory:
    def factory(cfg: ExperimentConfig, common: dict, cls: type | None = None) -> fs.Strategy:
        s = cfg.strategy
        return (cls or base)(**common, eta=s.server_lr, eta_l=cfg.federation.lr, tau=s.tau)

    return factory


register_strategy("fedadam", client_dp=True, server_optimizer=True)(_fedopt(fs.FedAdam))
register_strategy("fedyogi", client_dp=True, server_optimizer=True)(_fedopt(fs.FedYogi))
register_strategy("fedadagrad", client_dp=True, server_optimizer=True)(_fedopt(fs.FedAdagrad))


@register_strategy("fedavgm", client_dp=True, server_optimizer=True)
def _fedavgm(cfg: ExperimentConfig, common: dict, cls: type | None = None) -> fs.Strategy:
    s = cfg.strategy
    return (cls or fs.FedAvgM)(**common, server_learning_rate=s.server_lr, server_momentum=s.server_momentum)


@register_strategy("fedavg_modality", modality_counts=True)
def _fedavg_modality(cfg: ExperimentConfig, common: dict) -> fs.Strategy:
    from fedmer.federation.modality_aware import ModalityAwareFedAvg

    return ModalityAwareFedAvg(**common)


@register_strategy("fedmedian")
def _fedmedian(cfg: ExperimentConfig, common: dict) -> fs.Strategy:
    return fs.FedMedian(**common)


@register_strategy("fedtrimmedavg", min_clients=lambda f: 3)
def _fedtrimmedavg(cfg: ExperimentConfig, common: dict) -> fs.Strategy:
    return fs.FedTrimmedAvg(**common, beta=cfg.strategy.trim_beta)


@register_strategy("krum", min_clients=lambda f: 2 * f + 3)
def _krum(cfg: ExperimentConfig, common: dict) -> fs.Strategy:
    return fs.Krum(**common, num_malicious_nodes=cfg.strategy.num_malicious)


@register_strategy("multikrum", min_clients=lambda f: 2 * f + 3)
def _multikrum(cfg: ExperimentConfig, common: dict) -> fs.Strategy:
    select = max(1, cfg.federation.clients_per_round - cfg.strategy.num_malicious)
    return fs.MultiKrum(**common, num_malicious_nodes=cfg.strategy.num_malicious, num_nodes_to_select=select)


@register_strategy("bulyan", min_clients=lambda f: 4 * f + 3)
def _bulyan(cfg: ExperimentConfig, common: dict) -> fs.Strategy:
    return fs.Bulyan(**common, num_malicious_nodes=cfg.strategy.num_malicious)


class AccountedStrategy(fs.Strategy):
    """Delegate everything to a Flower strategy; record, order and police the replies.

    Policing (:mod:`fedmer.federation.guard`): a reply that is not a finite update of the
    global model within ``update_bound`` (measured here) is rejected and never aggregated; a
    non-finite aggregate is never applied (the round keeps the previous model).
    """

    def __init__(self, inner: fs.Strategy, update_bound: float = math.inf) -> None:
        self.inner = inner
        self.update_bound = update_bound
        self.rounds: dict[int, RoundReport] = {}
        self._sent: tuple[int, ArrayRecord] | None = None  # (round, global arrays sent)
        self._sampled_nodes: dict[int, list[int]] = {}  # round -> nodes sent a train message
        #: Rounds done before this process started (a resumed run): Flower's ``start`` counts
        #: from 1 again, so every round it names is shifted by this to the run's own round.
        self.round_offset = 0

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.rounds[server_round] = RoundReport(server_round, sampled=len(messages))
        self._sampled_nodes = {server_round: [m.metadata.dst_node_id for m in messages]}
        self._sent = (server_round, arrays)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = _ordered(replies)
        report = self.rounds.setdefault(server_round, RoundReport(server_round))
        sent = self._sent[1] if self._sent and self._sent[0] == server_round else None
        reference = as_arrays(sent) if sent is not None else None  # once a round, not per reply
        # Flower's DP wrappers hold the weighted strategy as ``.strategy``
        wrapped = getattr(self.inner, "strategy", None)
        inner_key = getattr(wrapped, "weighted_by_key", rk.NUM_EXAMPLES)
        weight_key = getattr(self.inner, "weighted_by_key", inner_key)
        accepted = []
        for msg in replies:
            if msg.has_error():
                text = msg.error.reason or f"error code {msg.error.code} without a reason"
                reason = f"node {msg.metadata.src_node_id}: {short_reason(text)}"
                (report.refusals if BUDGET_MARKER in text else report.failures).append(reason)
                accepted.append(msg)  # Flower's strategies skip error replies themselves
                continue
            why = check_reply(msg, reference, self.update_bound, weight_key)
            if why is not None:
                report.rejections.append(f"node {msg.metadata.src_node_id}: {why}")
                continue
            report.clients.append(dict(msg.content[rk.METRICS]))
            accepted.append(msg)
        for level, items, what in (
            (logging.ERROR, report.rejections, "update(s) rejected, not aggregated"),
            (logging.WARNING, report.refusals, "client(s) refused to train, their privacy budget is spent"),
            (logging.WARNING, report.failures, f"of {len(replies)} clients failed"),
        ):
            if items:
                log.log(level, "round %d: %d %s:\n  %s", server_round, len(items), what, "\n  ".join(items))
        if replies and not report.clients:
            first = (report.failures or report.rejections or report.refusals)[0]
            raise RuntimeError(
                f"round {server_round}: no sampled client trained ({len(report.failures)} failed, "
                f"{len(report.rejections)} rejected, {len(report.refusals)} refused: budget spent); "
                f"first: {first}"
            )
        # Killed, disconnected or too slow: a failure, counted like one. Count by replies, not
        # ids: the SuperLink answers for a node it saw die (NODE_UNAVAILABLE) under its own id.
        replied = {m.metadata.src_node_id for m in replies}
        missing = max(report.sampled - len(replies), 0)
        silent = [n for n in self._sampled_nodes.get(server_round, []) if n not in replied][:missing]
        for node in silent:
            report.failures.append(
                f"node {node}: no reply before the round's timeout (federation.round_timeout_s)"
            )
        if silent:
            log.warning(
                "round %d: %d of %d sampled clients did not reply", server_round, len(silent), report.sampled
            )
        arrays, metrics = self.inner.aggregate_train(server_round, accepted)
        why = check_aggregate(arrays)
        if arrays is None and report.clients:  # e.g. Bulyan with fewer replies than 4f + 3
            why = (
                f"{type(self.inner).__name__} made no model from {len(report.clients)} accepted "
                "update(s) (too few for its assumptions?)"
            )
        if why is not None:
            report.aggregate_rejected = f"{why}: kept the previous global model"
            log.error("round %d: %s", server_round, report.aggregate_rejected)
            return None, metrics
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round + self.round_offset, _ordered(replies))


def _ordered(replies: Iterable[Message]) -> list[Message]:
    """Replies sorted by partition id (errors last), so sums run in a fixed order."""

    def key(msg: Message) -> tuple[int, int]:
        if msg.has_error() or rk.METRICS not in msg.content:
            return (1, msg.metadata.src_node_id)
        return (0, int(rk.scalar(msg.content[rk.METRICS], rk.PARTITION_ID, 0)))

    return sorted(replies, key=key)


def _metrics_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted means of numeric metrics, skipping infinite values (non-private epsilon)."""
    weights = [float(rk.scalar(r[rk.METRICS], weight_key)) for r in records]
    total = sum(weights) or 1.0
    out: dict[str, MetricRecordValues] = {}
    for name in records[0][rk.METRICS]:
        if name in (weight_key, rk.PARTITION_ID):
            continue
        vals = [float(rk.scalar(r[rk.METRICS], name)) for r in records]
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
    factory = STRATEGY_REGISTRY.get(name)
    f = cfg.federation
    accounted = cfg.privacy.client_level and cfg.privacy.client_clipping == "fixed"
    common: dict[str, Any] = {  # keyword arguments of every Flower strategy
        # a node under minimal replies sends no sample count: every reply weighs the same
        "weighted_by_key": rk.CLIENT_WEIGHT if accounted or cfg.privacy.minimal_replies else rk.NUM_EXAMPLES,
        "fraction_train": f.fraction_train,
        "fraction_evaluate": f.fraction_evaluate,
        "min_train_nodes": f.min_train_clients,
        "min_evaluate_nodes": min(f.min_train_clients, f.num_clients) if f.fraction_evaluate > 0 else 0,
        "min_available_nodes": f.min_available_clients or f.num_clients,
        "train_metrics_aggr_fn": _metrics_mean,
        "evaluate_metrics_aggr_fn": _metrics_mean,
    }
    if cfg.privacy.client_level and STRATEGY_REGISTRY.meta(name)["server_optimizer"]:
        # Noise the plain average first, then let the server optimizer post-process it.
        dp = wrap_client_level_dp(fs.FedAvg(**common), cfg)
        optimizer_cls = type(factory(cfg, common))
        return AccountedStrategy(
            noised_server_optimizer(optimizer_cls, dp, lambda cls: factory(cfg, common, cls)),
            update_bound=cfg.privacy.update_clip_norm,
        )
    strategy = factory(cfg, common)
    if cfg.privacy.client_level:
        strategy = wrap_client_level_dp(strategy, cfg)
    return AccountedStrategy(strategy, update_bound=cfg.privacy.update_clip_norm)
