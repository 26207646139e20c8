"""Fusion of per-modality embeddings ``(B, M, H)`` under a modality mask ``(B, M)`` into logits.

Three classic points on the early/late spectrum, all honouring the mask exactly: an absent
modality's embedding never reaches the output (it is replaced by zeros with ``torch.where``,
not just scaled, so even non-finite garbage in a missing sensor cannot leak through), and a
sample with no modality at all yields finite logits instead of NaN.

Learned per-modality vectors are ``nn.Embedding`` rows looked up with a batch-expanded index
buffer: Opacus only sees parameters of layers it has per-sample grad samplers for, and the
Embedding sampler needs the index to carry the batch dimension.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fedmer.config import ConfigError

__all__ = [
    "FUSIONS",
    "AttentionFusion",
    "ConcatFusion",
    "Fusion",
    "LateFusion",
    "build_fusion",
]

logger = logging.getLogger(__name__)


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """One hidden layer head; small on purpose (DP noise grows with parameter count)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def _present(mask: Tensor) -> Tensor:
    """Float or bool ``(B, M)`` mask -> bool, so callers may pass either."""
    return mask > 0.5 if mask.is_floating_point() else mask.bool()


def _zero_absent(h: Tensor, present: Tensor) -> Tensor:
    """Zero the embeddings of absent modalities (``where`` also blocks NaN/inf)."""
    return torch.where(present.unsqueeze(-1), h, torch.zeros_like(h))


class Fusion(nn.Module):
    """Base: ``forward(h (B,M,H), mask (B,M)) -> logits (B,C)``; ``weights`` gives (B,M) or None."""

    def __init__(self, num_modalities: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.num_modalities = num_modalities
        self.hidden = hidden
        self.num_classes = num_classes

    def weights(self, h: Tensor, mask: Tensor) -> Tensor | None:
        """Per-modality contribution weights, or None where the fusion has no such notion."""
        return None


class ConcatFusion(Fusion):
    """Feature-level fusion: masked embeddings and the mask itself, concatenated, into an MLP.

    Feeding the mask lets the head tell "absent" from "present but near zero".
    """

    def __init__(self, num_modalities: int, hidden: int, num_classes: int) -> None:
        super().__init__(num_modalities, hidden, num_classes)
        self.head = _mlp(num_modalities * hidden + num_modalities, hidden, num_classes)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        present = _present(mask)
        z = _zero_absent(h, present).flatten(1)
        return self.head(torch.cat([z, present.to(h.dtype)], dim=1))


class AttentionFusion(Fusion):
    """Additive attention over modality tokens: ``score_m = v^T tanh(W (h_m + e_m))``.

    ``e_m`` is a learned modality-type embedding, so the scorer can prefer a sensor by
    identity as well as by content. Absent modalities get exactly zero weight; with none
    present every weight is zero and the fused vector is zero (no NaN).
    """

    def __init__(self, num_modalities: int, hidden: int, num_classes: int) -> None:
        super().__init__(num_modalities, hidden, num_classes)
        self.type_embedding = nn.Embedding(num_modalities, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.score = nn.Linear(hidden, 1, bias=False)
        self.head = _mlp(hidden, hidden, num_classes)
        self.register_buffer("modality_index", torch.arange(num_modalities), persistent=False)

    def _attend(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Fused ``(B, H)`` vector and ``(B, M)`` attention weights."""
        present = _present(mask)
        b = h.shape[0]
        tokens = _zero_absent(h, present) + self.type_embedding(self.modality_index.expand(b, -1))
        scores = self.score(torch.tanh(self.proj(tokens))).squeeze(-1)
        scores = scores.masked_fill(~present, float("-inf"))
        # A row with no modality would be softmax(all -inf) = NaN: give it finite scores,
        # then the multiply by ``present`` zeroes every weight of that row.
        any_present = present.any(dim=1, keepdim=True)
        scores = torch.where(any_present, scores, torch.zeros_like(scores))
        w = torch.softmax(scores, dim=1) * present.to(h.dtype)
        fused = torch.einsum("bm,bmh->bh", w, tokens)
        return fused, w

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        fused, _ = self._attend(h, mask)
        return self.head(fused)

    def weights(self, h: Tensor, mask: Tensor) -> Tensor:
        """Attention weights ``(B, M)``: rows sum to 1 over present modalities, 0 if none."""
        return self._attend(h, mask)[1]


class LateFusion(Fusion):
    """Decision-level fusion: one classifier per modality, logits averaged over present ones.

    Robust to missing sensors by construction; a sample with nothing present gets
    all-zero logits (a uniform prediction).
    """

    def __init__(self, num_modalities: int, hidden: int, num_classes: int) -> None:
        super().__init__(num_modalities, hidden, num_classes)
        self.heads = nn.ModuleList(_mlp(hidden, hidden, num_classes) for _ in range(num_modalities))

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        present = _present(mask)
        logits = torch.stack([head(h[:, m]) for m, head in enumerate(self.heads)], dim=1)  # (B, M, C)
        logits = _zero_absent(logits, present)
        w = self.weights(h, mask)
        return torch.einsum("bm,bmc->bc", w, logits)

    def weights(self, h: Tensor, mask: Tensor) -> Tensor:
        """Uniform weights over present modalities (what the average actually uses)."""
        p = _present(mask).to(h.dtype)
        return p / p.sum(dim=1, keepdim=True).clamp(min=1.0)


FusionFactory = Callable[[int, int, int], Fusion]

#: name -> factory ``(num_modalities, hidden, num_classes) -> Fusion``.
FUSIONS: dict[str, FusionFactory] = {
    "concat": ConcatFusion,
    "attention": AttentionFusion,
    "late": LateFusion,
}


def build_fusion(name: str, num_modalities: int, hidden: int, num_classes: int) -> Fusion:
    """Instantiate a registered fusion; unknown names fail listing the valid ones."""
    if name not in FUSIONS:
        raise ConfigError(f"invalid model.fusion={name!r}: expected one of {', '.join(sorted(FUSIONS))}")
    logger.debug("fusion %s: M=%d hidden=%d classes=%d", name, num_modalities, hidden, num_classes)
    return FUSIONS[name](num_modalities, hidden, num_classes)
