"""Classification metrics for emotion recognition, in pure numpy.

Emotion corpora are imbalanced, so besides accuracy FedMER reports unweighted average
recall (UAR, the customary headline metric of affective-computing challenges) and macro F1.

Conventions for classes that are absent, chosen so that nothing is ever NaN and a federated
client holding only some classes is not penalised for classes it cannot see:

* **Recall / UAR** are defined over classes *present in ``y_true``*. ``per_class_recall``
  still has one entry per class; a class with no support gets 0.0 there, but is excluded
  from ``uar`` (so ``uar`` is the mean of ``per_class_recall`` over supported classes).
* **F1** of a class with neither support nor predictions is undefined (0/0) and excluded
  from ``macro_f1``. A class with support but no predictions, or predictions but no
  support, has F1 = 0 and is included (a false alarm class should cost something).
* With no samples at all every score is 0.0.
"""

from __future__ import annotations

import numpy as np

__all__ = ["classification_report", "confusion_matrix"]


def _labels(y: np.ndarray, num_classes: int, name: str) -> np.ndarray:
    """Flatten to int64 and reject out-of-range labels (a silent miscount is worse)."""
    arr = np.asarray(y).reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer) and not np.all(np.mod(arr, 1) == 0):
        raise ValueError(f"{name} must hold integer class indices")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(f"{name} has labels outside [0, {num_classes}): min={arr.min()}, max={arr.max()}")
    return arr


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` int64 counts; row = true class, column = predicted class."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    t = _labels(y_true, num_classes, "y_true")
    p = _labels(y_pred, num_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict:
    """Accuracy, macro F1, UAR, per-class recall and the confusion matrix (see module doc).

    Returns plain Python floats and lists, so the result is JSON-serialisable as is.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    n = int(cm.sum())
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)  # true count per class
    predicted = cm.sum(axis=0).astype(np.float64)  # predicted count per class

    has_support = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=has_support)
    uar = float(recall[has_support].mean()) if has_support.any() else 0.0

    denom = support + predicted  # F1 = 2TP / (2TP + FP + FN) = 2TP / (support + predicted)
    f1_defined = denom > 0
    f1 = np.divide(2.0 * tp, denom, out=np.zeros_like(tp), where=f1_defined)
    macro_f1 = float(f1[f1_defined].mean()) if f1_defined.any() else 0.0

    return {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": macro_f1,
        "uar": uar,
        "per_class_recall": [float(r) for r in recall],
        "confusion": cm.tolist(),
        "n": n,
    }
