"""Post-hoc evaluation of a finished run's global model (missing modalities at test time)."""

from fedmer.evaluation.inference import dataset_logits, score
from fedmer.evaluation.missing import (
    RATES,
    MissingResult,
    chance_uar,
    drop_at_random,
    evaluate_missing,
    keep_only,
    remove_modality,
)
from fedmer.evaluation.missing_report import missing_run

__all__ = [
    "RATES",
    "MissingResult",
    "chance_uar",
    "dataset_logits",
    "drop_at_random",
    "evaluate_missing",
    "keep_only",
    "missing_run",
    "remove_modality",
    "score",
]
