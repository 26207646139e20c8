"""One round of a run as a row: the schema of ``rounds.csv`` and how the server fills it.

The row carries the held-out metrics, every epsilon with its delta, accountant and unit, and
the round's health (clients sampled, replied, failed, refused); the detail that does not fit
a CSV cell (per-class recall, confusion matrix, each client's epsilon) goes to ``rounds.jsonl``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fedmer import records as rk
from fedmer.config import ExperimentConfig

__all__ = ["CSV_COLUMNS", "RoundReport", "round_row", "run_failure"]

CSV_COLUMNS = (
    "round",
    "accuracy",
    "macro_f1",
    "uar",
    "loss",
    "intensity_uar",  # empty without an intensity head (model.intensity_weight = 0)
    "intensity_accuracy",
    "epsilon_max",
    "epsilon_mean",
    "delta",
    "accountant",
    "privacy_unit",
    "clients_sampled",
    "clients_replied",
    "clients_failed",
    "clients_refused",
    "clients_rejected",  # replies not aggregated (non-finite, wrong shape, norm above C)
    "client_epsilon",
    "train_loss",
    "update_norm_mean",
    "update_clipped_frac",
    "elapsed_s",
)


@dataclass
class RoundReport:
    """What one round's training replies said, client by client."""

    server_round: int
    sampled: int = 0
    failures: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)  # nodes whose privacy budget is spent
    rejections: list[str] = field(default_factory=list)  # replies the server refused to aggregate
    aggregate_rejected: str | None = None  # why the round kept the previous model
    clients: list[dict] = field(default_factory=list)  # one MetricRecord (as dict) per reply

    def epsilons(self) -> list[float]:
        return [float(c[rk.EPSILON]) for c in self.clients if rk.EPSILON in c]


def round_row(
    server_round: int,
    report: dict[str, Any],
    rr: RoundReport | None,
    cfg: ExperimentConfig,
    elapsed: float,
    client_eps: float | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The CSV row (:data:`CSV_COLUMNS`) and the JSONL detail of one evaluated round.

    ``report`` is the held-out evaluation, ``rr`` what the round's training replies said
    (None for round 0), ``client_eps`` Flower's client-level epsilon (None when not accounted).
    """
    clients = rr.clients if rr else []
    eps = rr.epsilons() if rr else []
    off = not cfg.privacy.sample_level
    # absent under privacy.reply_metrics=minimal: nodes send no exact statistic of their data
    norms = [float(c[rk.UPDATE_NORM]) for c in clients if rk.UPDATE_NORM in c]
    losses = [float(c[rk.TRAIN_LOSS]) for c in clients if rk.TRAIN_LOSS in c]
    clipped = [float(c[rk.UPDATE_CLIPPED]) for c in clients if rk.UPDATE_CLIPPED in c]
    row = {
        "round": server_round,
        "accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"],
        "uar": report["uar"],
        "loss": report["loss"],
        "intensity_uar": report.get("intensity_uar"),
        "intensity_accuracy": report.get("intensity_accuracy"),
        "epsilon_max": (math.inf if off else max(eps)) if eps else (math.inf if off and clients else 0.0),
        "epsilon_mean": (math.inf if off else statistics.fmean(eps))
        if eps
        else (math.inf if off and clients else 0.0),
        "delta": None if off else cfg.privacy.delta,
        "accountant": "none" if off else cfg.privacy.accountant,
        "privacy_unit": "none" if off else "sample",
        "clients_sampled": rr.sampled if rr else 0,
        "clients_replied": len(clients),
        "clients_failed": len(rr.failures) if rr else 0,
        "clients_refused": len(rr.refusals) if rr else 0,
        "clients_rejected": len(rr.rejections) if rr else 0,
        "train_loss": statistics.fmean(losses) if losses else None,
        "update_norm_mean": statistics.fmean(norms) if norms else None,
        "update_clipped_frac": statistics.fmean(clipped) if clipped else None,
        "client_epsilon": client_eps,
        "elapsed_s": round(elapsed, 3),
    }
    detail = {
        "per_class_recall": report["per_class_recall"],
        "confusion": report["confusion"],
        "client_epsilons": {int(c[rk.PARTITION_ID]): float(c[rk.EPSILON]) for c in clients},
        "failures": rr.failures if rr else [],
        "refusals": rr.refusals if rr else [],
        "rejections": rr.rejections if rr else [],
        "aggregate_rejected": rr.aggregate_rejected if rr else None,
        "client_epsilons_lifetime": {
            int(c[rk.PARTITION_ID]): float(c[rk.EPSILON_LIFETIME])
            for c in clients
            if rk.EPSILON_LIFETIME in c
        },
    }
    return row, detail


def run_failure(rounds: Iterable[RoundReport], max_failed_fraction: float) -> str | None:
    """Why the run failed, or None: too many trainings failed, or too many rounds kept the old model.

    A training that failed (the client raised, was killed, timed out) or whose update the
    server rejected did not contribute; when more than ``max_failed_fraction`` of the sampled
    trainings are such, the model is not what the config describes, and the run must not
    exit 0 (a 10,000-client simulation once lost 21 of 30 trainings to the OOM killer and
    reported success). Refusals (a spent privacy budget) are a node's policy, not a failure.
    """
    reports = list(rounds)
    sampled = sum(r.sampled for r in reports)
    bad = sum(len(r.failures) + len(r.rejections) for r in reports)
    missing = sum(max(r.sampled - len(r.clients) - len(r.failures) - len(r.rejections) - len(r.refusals), 0)
                  for r in reports)  # fmt: skip
    bad += missing  # sampled but never replied (e.g. timed out)
    if sampled and bad / sampled > max_failed_fraction:
        return (
            f"{bad} of {sampled} sampled trainings failed, were rejected or never replied "
            f"(more than federation.max_failed_fraction={max_failed_fraction:g})"
        )
    # Rounds that kept the previous model (non-finite aggregate, or a strategy that made none):
    # a run whose model mostly never moved is not the run the config describes either.
    trained = [r for r in reports if r.sampled]
    stuck = [r.server_round for r in trained if r.aggregate_rejected]
    if trained and len(stuck) / len(trained) > max_failed_fraction:
        return (
            f"{len(stuck)} of {len(trained)} rounds produced no new global model (rounds {stuck[:10]}; "
            f"first: {next(r.aggregate_rejected for r in trained if r.aggregate_rejected)}) "
            f"(more than federation.max_failed_fraction={max_failed_fraction:g})"
        )
    return None
