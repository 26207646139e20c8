"""The model's first layer when features are standardised: ``(x - mean) / std``, not trained.

The statistics are persistent buffers, so they travel inside the global model: in every
message, in the checkpoint, into every post-hoc tool, and the test data of any evaluation
is scaled exactly as the training data was. Their update is zero in every round, so
FedAvg-style aggregation (and the update clipping) leaves them untouched. Buffers have no
gradient, so Opacus neither clips nor noises them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedmer.data.feature_stats import FeatureStats

__all__ = ["InputStandardizer"]


class InputStandardizer(nn.Module):
    """``x (B, T, F) -> (x - shift) * scale`` per feature; identity until :meth:`set_stats`."""

    shift: Tensor
    scale: Tensor

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(num_features))
        self.register_buffer("scale", torch.ones(num_features))

    def set_stats(self, stats: FeatureStats) -> None:
        """Use ``stats`` from now on (``scale`` = 1 / std)."""
        if len(stats.mean) != self.shift.numel():
            raise ValueError(
                f"feature statistics for {len(stats.mean)} features, but the model reads "
                f"{self.shift.numel()}: were they computed on another dataset or modality set?"
            )
        with torch.no_grad():
            self.shift.copy_(torch.tensor(stats.mean, dtype=self.shift.dtype))
            self.scale.copy_(1.0 / torch.tensor(stats.std, dtype=self.scale.dtype))

    def forward(self, x: Tensor) -> Tensor:
        f = self.shift.numel()
        return (x[..., :f] - self.shift) * self.scale
