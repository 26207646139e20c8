"""Which modality made the model say what it said: per-prediction modality contributions.

Two views, because they answer different questions:

* **the model's own weights** (``model.modality_weights``: attention softmax, gate values),
  where the fusion has them: where the model *looked*. Weights can be large on a modality
  the head then largely ignores, so they are not evidence of influence on their own;
* **ablation**, always: the drop in the predicted class's probability (and logit) when one
  modality is masked out (mask False, columns zeroed, exactly as a missing sensor). Positive
  means the modality supported the prediction; about zero means it did not matter.

A modality the sample never recorded is reported as absent (``present=False``, weight and
deltas ``None``), never as a zero contribution: "not there" and "there but irrelevant" are
different findings. Everything runs on a plain module under ``torch.no_grad`` (no autograd,
no Opacus wrapper), so explaining costs no privacy and touches no training state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmer.data.base import MultimodalDataset
from fedmer.posthoc.inference import dataset_logits

__all__ = [
    "Explanation",
    "ModalityContribution",
    "explain",
    "mean_contributions",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModalityContribution:
    """One modality's part in one prediction; every number is None when it was absent."""

    modality: str
    present: bool
    weight: float | None  # the fusion's own weight (None: absent, or the fusion has no weights)
    prob_drop: float | None  # p(predicted | all present) - p(predicted | this one masked out)
    logit_drop: float | None  # same, in the predicted class's logit


@dataclass(frozen=True)
class Explanation:
    """One sample's prediction and its per-modality contributions."""

    index: int  # position in the dataset that was explained
    predicted: str
    predicted_index: int
    true: str
    true_index: int
    probabilities: tuple[float, ...]
    contributions: tuple[ModalityContribution, ...]

    @property
    def correct(self) -> bool:
        return self.predicted_index == self.true_index

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["correct"] = self.correct
        return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


@torch.no_grad()
def _fusion_weights(model: nn.Module, data: MultimodalDataset) -> np.ndarray | None:
    weigh = getattr(model, "modality_weights", None)
    if weigh is None:
        return None
    x = torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32))
    w = weigh(x, torch.from_numpy(data.mask.astype(np.float32)))
    return None if w is None else w.detach().double().numpy()


def explain(
    model: nn.Module, data: MultimodalDataset, indices: Sequence[int] | None = None
) -> tuple[Explanation, ...]:
    """Explain ``model``'s predictions on ``data[indices]`` (all samples when None)."""
    if hasattr(model, "_module"):
        raise TypeError("explain a plain model, not an Opacus GradSampleModule: pass its ._module")
    idx = np.arange(len(data)) if indices is None else np.asarray(list(indices), dtype=np.int64)
    bad = idx[(idx < 0) | (idx >= len(data))]
    if bad.size:
        raise ValueError(f"invalid sample index {int(bad[0])}: the dataset has indices 0..{len(data) - 1}")
    sub = data.subset(idx)
    model.eval()
    logits = dataset_logits(model, sub)
    probs = _softmax(logits)
    pred = logits.argmax(axis=1)
    rows = np.arange(len(sub))
    weights = _fusion_weights(model, sub)
    prob_drop = np.full(sub.mask.shape, np.nan)
    logit_drop = np.full(sub.mask.shape, np.nan)
    for j in range(len(sub.modalities)):
        mask = sub.mask.copy()
        mask[:, j] = False
        ablated = dataset_logits(model, sub.with_mask(mask))
        prob_drop[:, j] = probs[rows, pred] - _softmax(ablated)[rows, pred]
        logit_drop[:, j] = logits[rows, pred] - ablated[rows, pred]
    out = []
    for i in rows:
        contrib = tuple(
            ModalityContribution(
                modality=m,
                present=bool(sub.mask[i, j]),
                weight=float(weights[i, j]) if weights is not None and sub.mask[i, j] else None,
                prob_drop=float(prob_drop[i, j]) if sub.mask[i, j] else None,
                logit_drop=float(logit_drop[i, j]) if sub.mask[i, j] else None,
            )
            for j, m in enumerate(sub.modalities)
        )
        out.append(
            Explanation(
                index=int(idx[i]),
                predicted=sub.class_names[int(pred[i])],
                predicted_index=int(pred[i]),
                true=sub.class_names[int(sub.y[i])],
                true_index=int(sub.y[i]),
                probabilities=tuple(float(p) for p in probs[i]),
                contributions=contrib,
            )
        )
    return tuple(out)


def mean_contributions(
    explanations: Sequence[Explanation], class_names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per predicted class: how many samples, and per modality the mean drop and weight.

    Grouped by the *predicted* class, since the ablation measures support for the prediction.
    Per modality ``n`` is how many of those samples recorded it (the means' denominator);
    means are None where no sample of the class recorded it.
    """
    mods = [c.modality for c in explanations[0].contributions] if explanations else []
    table: dict[str, dict[str, Any]] = {}
    for c in class_names:
        group = [e for e in explanations if e.predicted == c]
        per_modality: dict[str, dict[str, float | int | None]] = {}
        for j, m in enumerate(mods):
            present = [e.contributions[j] for e in group if e.contributions[j].present]
            weights = [p.weight for p in present if p.weight is not None]
            per_modality[m] = {
                "n": len(present),
                "mean_prob_drop": float(np.mean([p.prob_drop for p in present])) if present else None,
                "mean_logit_drop": float(np.mean([p.logit_drop for p in present])) if present else None,
                "mean_weight": float(np.mean(weights)) if weights else None,
            }
        table[c] = {"n_predicted": len(group), "modalities": per_modality}
    return table
