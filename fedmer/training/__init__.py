"""Local training: the loops, the ONE local (DP-)training function, the centralised trainer, metrics.

Every place that fits a model on a node's data (the ClientApp, the audit's shadow models,
personalisation) calls :func:`fedmer.training.local.train_local`, so DP-SGD is set up one way.
"""

from fedmer.training.local import DPSGD, LocalResult, train_local
from fedmer.training.loops import (
    TrainResult,
    evaluate_model,
    make_loader,
    predict,
    seed_everything,
    train_epochs,
)
from fedmer.training.metrics import classification_report, confusion_matrix

__all__ = [
    "DPSGD",
    "LocalResult",
    "TrainResult",
    "classification_report",
    "confusion_matrix",
    "evaluate_model",
    "make_loader",
    "predict",
    "seed_everything",
    "train_epochs",
    "train_local",
]
