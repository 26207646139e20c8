"""The privacy statement of a run: what its reported epsilon protects, at which delta, by which accountant.

Written into ``config.json`` and ``summary.json`` (and carried by the saved model), so an epsilon
is never read without its unit, delta and accountant.
"""

from __future__ import annotations

from typing import Any

from fedmer import records as rk
from fedmer import registry
from fedmer.config import ExperimentConfig
from fedmer.privacy.client_level import client_noise_multiplier

__all__ = ["privacy_statement", "sent_in_clear"]


def sent_in_clear(cfg: ExperimentConfig) -> dict[str, list[str]]:
    """Per reply type, what else leaves a node, neither noised nor accounted (README: What leaves a node)."""
    p = cfg.privacy
    train = sorted(rk.TRAIN_REPLY_METRICS_MINIMAL if p.minimal_replies else rk.TRAIN_REPLY_METRICS)
    if p.reply_metrics != "minimal" and registry.STRATEGIES.meta(cfg.strategy.name).get("modality_counts"):
        train.append(f"{rk.MODALITY_COUNT_PREFIX}<i>")
    out = {"train": train}
    if cfg.federation.fraction_evaluate > 0:
        out["evaluate"] = sorted(rk.EVALUATE_REPLY_METRICS)
    return out


def _standardization(cfg: ExperimentConfig) -> str:
    """Where the input statistics come from, and what protects them."""
    if cfg.data.standardize == "federated":
        if cfg.privacy.sample_level:
            return "federated: each client's noised feature sums, a release inside its epsilon"
        return "federated: each client's exact feature sums (no DP in this run)"
    if cfg.data.standardize == "calibration":
        return (
            f"calibration: exact statistics of the persons of {cfg.data.calibration_sites} calibration "
            "site(s) the server holds, public by assumption: no client's data, not protected by any epsilon"
        )
    return "none"


def privacy_statement(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the reported epsilon means for this run, and what else its nodes send."""
    p = cfg.privacy
    statement: dict[str, Any] = {
        "mode": p.mode,
        "reply_metrics": p.reply_metrics,
        "sent_in_clear": sent_in_clear(cfg),
        "standardization": _standardization(cfg),
    }
    if p.client_level:
        accounted = p.client_clipping == "fixed"
        statement["client_level"] = {
            "unit": "one whole client (a vehicle or hospital with all its data, add/remove)",
            "accountant": "Flower RDP (dp-accounting), no sampling amplification" if accounted else "none",
            "delta": p.delta if accounted else None,
            "noise_multiplier": client_noise_multiplier(cfg),
            "target_epsilon": p.target_epsilon if p.client_noise_multiplier is None else None,
            "clipping": f"{p.client_clipping}, {p.client_clipping_side}-side, norm {p.update_clip_norm}",
            "note": "client_epsilon in rounds.csv" if accounted else "adaptive clipping is not accounted",
        }
    if not p.sample_level:
        statement.update(
            unit="none",
            accountant="none",
            delta=None,
            note="no DP-SGD inside clients: sample-level epsilon is infinite",
        )
        return statement
    return {
        **statement,
        "unit": "sample (one training sequence of one person, add/remove) within each client",
        "accountant": p.accountant,
        "delta": p.delta,
        "target_epsilon": p.target_epsilon if p.noise_multiplier is None else None,
        "noise_multiplier": p.noise_multiplier if p.noise_multiplier is not None else "derived from target",
        "per_sample_clip": p.max_grad_norm,
        "recipe": (
            "auto: per client, the sampling rate, local steps and lr with the most steps whose noise "
            "per averaged gradient stays within a bound, chosen from the client's size, the rounds and "
            "(epsilon, delta) only (summary.json: local_recipes)"
            if p.recipe == "auto"
            else "manual: federation.batch_size, local_epochs and lr as configured"
        ),
        "update_clip_norm": p.update_clip_norm,
        "note": "epsilon is cumulative over every round the client trained in; "
        "max over clients is the figure to quote",
    }
