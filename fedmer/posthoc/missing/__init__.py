"""A finished run's global model with modalities missing at test time (``fedmer missing``)."""

from fedmer.posthoc.missing.evaluate import (
    RATES,
    MissingResult,
    chance_uar,
    drop_at_random,
    evaluate_missing,
    keep_only,
    remove_modality,
)
from fedmer.posthoc.missing.report import missing_run

__all__ = [
    "RATES",
    "MissingResult",
    "chance_uar",
    "drop_at_random",
    "evaluate_missing",
    "keep_only",
    "missing_run",
    "remove_modality",
]
