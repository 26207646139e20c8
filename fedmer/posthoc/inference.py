"""Logits of a plain model on a dataset, in batches, checked to be finite.

The post-hoc tools need the logits themselves (probabilities for explanations, the argmax
for metrics), and they must never silently score NaN as "class 0": a sample whose every
modality is masked out is a legitimate input, and the fusion promises finite logits for it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedmer.data.base import MultimodalDataset
from fedmer.training.metrics import classification_report

__all__ = ["dataset_logits", "score"]


@torch.no_grad()
def dataset_logits(model: nn.Module, data: MultimodalDataset, batch_size: int = 512) -> np.ndarray:
    """``(N, C)`` float64 logits of ``model`` on ``data`` (eval mode, no autograd).

    Raises ``FloatingPointError`` naming the first offending sample if any logit is not finite.
    """
    if hasattr(model, "_module"):
        raise TypeError("expected a plain model, got an Opacus GradSampleModule; pass its ._module")
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32))
    mask = torch.from_numpy(data.mask.astype(np.float32))
    out = [model(x[s : s + batch_size], mask[s : s + batch_size]) for s in range(0, len(data), batch_size)]
    logits = torch.cat(out).double().numpy() if out else np.zeros((0, data.num_classes))
    bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
    if bad.size:
        i = int(bad[0])
        raise FloatingPointError(
            f"model gave non-finite logits for {bad.size} sample(s), first index {i} "
            f"(mask {data.mask[i].astype(int).tolist()} over {list(data.modalities)})"
        )
    return logits


def score(model: nn.Module, data: MultimodalDataset) -> dict:
    """UAR, accuracy, macro-F1, per-class recall and confusion of ``model`` on ``data``."""
    y_pred = dataset_logits(model, data).argmax(axis=1) if len(data) else np.zeros(0, np.int64)
    return classification_report(data.y, y_pred, data.num_classes)
