"""What every fusion shares: the ``Fusion`` interface and the mask-handling primitives.

A fusion maps per-modality embeddings ``(B, M, H)`` and a modality mask ``(B, M)`` to output
logits. Every fusion must honour the mask exactly: an absent modality's embedding never
reaches the output (it is replaced with ``torch.where``, not scaled, so even non-finite
garbage cannot leak through), and a sample with no modality at all yields finite logits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Fusion", "masked_softmax", "mlp", "present_of", "uniform_weights", "zero_absent"]


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """One hidden layer head; small on purpose (DP noise grows with parameter count)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def present_of(mask: Tensor) -> Tensor:
    """Float or bool ``(B, M)`` mask -> bool, so callers may pass either."""
    return mask > 0.5 if mask.is_floating_point() else mask.bool()


def zero_absent(h: Tensor, present: Tensor) -> Tensor:
    """Zero the ``(B, M, ...)`` entries of absent modalities (``where`` also blocks NaN/inf)."""
    shape = present.shape + (1,) * (h.dim() - present.dim())
    return torch.where(present.reshape(shape), h, torch.zeros_like(h))


def masked_softmax(scores: Tensor, allowed: Tensor, dim: int = -1) -> Tensor:
    """Softmax over the ``allowed`` entries of ``scores``; exactly 0 elsewhere.

    A slice with nothing allowed (a sample with no modality, a token with no other
    modality to attend to) would be softmax(all -inf) = NaN: it gets all-zero weights.
    """
    scores = scores.masked_fill(~allowed, float("-inf"))
    any_allowed = allowed.any(dim=dim, keepdim=True)
    scores = torch.where(any_allowed, scores, torch.zeros_like(scores))
    return torch.softmax(scores, dim=dim) * allowed.to(scores.dtype)


def uniform_weights(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``(B, M)``: 1/#present on present modalities, 0 elsewhere (all 0 if none present)."""
    p = present_of(mask).to(dtype)
    return p / p.sum(dim=1, keepdim=True).clamp(min=1.0)


class Fusion(nn.Module):
    """Base: ``forward(h (B,M,H), mask (B,M)) -> logits (B, num_outputs)``.

    ``num_outputs`` is the category count, plus the intensity-level count when the model
    has an intensity head (the network splits the columns; see ``MultimodalEmotionNet``).
    ``weights`` gives each modality's ``(B, M)`` contribution, or None.
    """

    def __init__(self, num_modalities: int, hidden: int, num_outputs: int) -> None:
        super().__init__()
        self.num_modalities = num_modalities
        self.hidden = hidden
        self.num_outputs = num_outputs

    def weights(self, h: Tensor, mask: Tensor) -> Tensor | None:
        """Per-modality contribution weights, or None where the fusion has no such notion."""
        return None
