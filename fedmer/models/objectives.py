"""Cross-modal auxiliary objectives that DP-SGD can train: one loss value per sample.

Opacus clips each sample's gradient, which bounds one sample's influence only if the loss
is a mean of per-sample terms. The published objectives these follow are batch-coupled:
deep CCA correlates the two views *over the batch* under batch-covariance whitening, and
contrastive losses such as Joyful's use the *other samples* of the batch as negatives, so
one sample's gradient would depend on (and leak through) its batch mates and clipping
would no longer bound its contribution. The surrogates here keep the idea and drop the
coupling; each ``forward`` returns a ``(B,)`` vector whose entry ``i`` depends only on
sample ``i`` and the parameters (tested: a batch's mean equals the mean over samples alone).

Data-independent regularisers (the CCA surrogate's orthogonality penalty) are computed by
passing a constant input through the layer for every sample, so they reach Opacus'
per-sample gradients like any other term; a loss term on a raw parameter would be dropped
silently by the DP optimizer, which replaces ``p.grad`` with noisy clipped per-sample sums.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmer import registry
from fedmer.models.fusion_base import present_of, uniform_weights, zero_absent

__all__ = [
    "AUX_OBJECTIVES",
    "AuxObjective",
    "CCAAlignment",
    "PrototypeContrastive",
    "build_aux_objective",
    "intensity_loss",
]

logger = logging.getLogger(__name__)


def _pair_index(num_modalities: int) -> tuple[Tensor, Tensor]:
    """Indices ``(i, j)``, ``i < j``, of every modality pair."""
    i, j = torch.triu_indices(num_modalities, num_modalities, offset=1)
    return i, j


class AuxObjective(nn.Module):
    """``forward(h (B,M,H), mask (B,M), y (B,)) -> (B,)`` per-sample auxiliary loss.

    Pair terms average over the pairs of modalities present in that sample (0 when it has
    fewer than two), so a sample's loss never depends on another sample's mask.
    """

    pair_i: Tensor
    pair_j: Tensor

    def __init__(self, num_modalities: int) -> None:
        super().__init__()
        i, j = _pair_index(num_modalities)
        self.register_buffer("pair_i", i, persistent=False)
        self.register_buffer("pair_j", j, persistent=False)

    def pair_weights(self, present: Tensor, dtype: torch.dtype) -> Tensor:
        """``(B, P)``: 1/#present-pairs on pairs whose both modalities are present, else 0."""
        both = (present[:, self.pair_i] & present[:, self.pair_j]).to(dtype)
        return both / both.sum(dim=1, keepdim=True).clamp(min=1.0)

    def pair_mean(self, u: Tensor, present: Tensor) -> Tensor:
        """Per-sample mean over present pairs of ``1 - <u_i, u_j>`` for unit rows ``u (B, M, D)``."""
        sim = (u[:, self.pair_i] * u[:, self.pair_j]).sum(dim=-1)  # (B, P)
        return (self.pair_weights(present, u.dtype) * (1.0 - sim)).sum(dim=1)


class CCAAlignment(AuxObjective):
    """Per-sample surrogate of deep CCA (as used by Liu et al. for multimodal emotion recognition).

    Each modality ``m`` has a linear projection ``W_m`` (``H -> D``) into a shared space. Per
    sample, the projections of two present modalities are centred and scaled over their
    ``D`` components and their correlation ``rho`` is maximised (loss ``1 - rho``). DCCA's
    whitening constraint ``U^T Sigma U = I`` needs the batch covariance; instead each
    projection is pushed towards orthonormal rows, ``||W_m W_m^T - I||_F^2``, which keeps
    the shared space ``D``-dimensional without looking at other samples. Unlike DCCA this
    cannot stop the encoders from collapsing every embedding to one direction; the
    classification loss is what keeps them discriminative.
    """

    basis: Tensor
    identity: Tensor

    def __init__(self, num_modalities: int, hidden: int, dim: int | None = None, ortho: float = 1.0) -> None:
        super().__init__(num_modalities)
        self.dim = dim or max(1, hidden // 2)
        self.ortho = ortho
        self.proj = nn.ModuleList(nn.Linear(hidden, self.dim, bias=False) for _ in range(num_modalities))
        self.register_buffer("basis", torch.eye(hidden), persistent=False)
        self.register_buffer("identity", torch.eye(self.dim), persistent=False)

    def orthogonality(self, batch: int) -> Tensor:
        """``(B,)`` copies of ``mean_m ||W_m W_m^T - I||_F^2``, routed through each layer per sample."""
        basis = self.basis.expand(batch, -1, -1)
        penalties = []
        for proj in self.proj:
            w_t = proj(basis)  # (B, H, D): W^T, once per sample
            gram = w_t.transpose(1, 2) @ w_t
            penalties.append((gram - self.identity).pow(2).sum(dim=(1, 2)))
        return torch.stack(penalties, dim=1).mean(dim=1)

    def forward(self, h: Tensor, mask: Tensor, y: Tensor) -> Tensor:
        present = present_of(mask)
        z = zero_absent(h, present)
        u = torch.stack([proj(z[:, m]) for m, proj in enumerate(self.proj)], dim=1)  # (B, M, D)
        u = F.normalize(u - u.mean(dim=-1, keepdim=True), dim=-1)
        return self.pair_mean(u, present) + self.ortho * self.orthogonality(h.shape[0])


class PrototypeContrastive(AuxObjective):
    """Per-sample cross-modal contrastive loss against learned class prototypes (after Joyful).

    A shared projection head maps each present modality's embedding to the unit sphere;
    (1) each projection is classified by cosine similarity to ``C`` learned unit prototypes
    at temperature ``tau`` (its own class's prototype is the positive, the other classes'
    prototypes are the negatives: parameters, not other samples), averaged over present
    modalities; (2) a sample's modality projections are pulled together (``1 - cos``
    averaged over present pairs). Li et al. (2023) contrast augmented graph views against
    in-batch negatives, which couples samples; this keeps the cross-modal pull and the
    class-level push without that coupling.
    """

    class_index: Tensor

    def __init__(
        self, num_modalities: int, hidden: int, num_classes: int, dim: int | None = None, tau: float = 0.2
    ) -> None:
        super().__init__(num_modalities)
        self.dim = dim or max(1, hidden // 2)
        self.tau = tau
        self.proj = nn.Linear(hidden, self.dim)
        # Embedding rows looked up with a batch-expanded index: Opacus' Embedding sampler
        # gives them per-sample grads (a bare Parameter in forward would get none).
        self.prototypes = nn.Embedding(num_classes, self.dim)
        self.register_buffer("class_index", torch.arange(num_classes), persistent=False)

    def forward(self, h: Tensor, mask: Tensor, y: Tensor) -> Tensor:
        present = present_of(mask)
        b, m = present.shape
        u = F.normalize(self.proj(zero_absent(h, present)), dim=-1)  # (B, M, D)
        protos = F.normalize(self.prototypes(self.class_index.expand(b, -1)), dim=-1)  # (B, C, D)
        logits = torch.einsum("bmd,bcd->bmc", u, protos) / self.tau
        ce = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(m), reduction="none").view(b, m)
        prototype_term = (uniform_weights(present, h.dtype) * ce).sum(dim=1)
        return prototype_term + self.pair_mean(u, present)


#: ``model.aux_loss`` values with an objective (``none`` has none).
AUX_OBJECTIVES = registry.AUX_LOSSES
AUX_OBJECTIVES.register("cca", lambda m, hidden, _classes: CCAAlignment(m, hidden))
AUX_OBJECTIVES.register("contrastive", PrototypeContrastive)


def build_aux_objective(name: str, num_modalities: int, hidden: int, num_classes: int) -> AuxObjective | None:
    """The objective for ``model.aux_loss``; None for ``none``; unknown names fail listing valid ones."""
    AUX_OBJECTIVES.check(name)
    if name == "none":
        return None
    return AUX_OBJECTIVES.get(name)(num_modalities, hidden, num_classes)


def intensity_loss(logits: Tensor, intensity: Tensor) -> Tensor:
    """Per-sample intensity cross-entropy, exactly 0 where the label is -1 (unlabelled).

    Not ``CrossEntropyLoss(ignore_index=-1)``: its mean divides by the number of labelled
    samples in the batch, a batch statistic. The 0 still flows through the head, so Opacus
    gets a (zero) per-sample grad for it even in a batch with no intensity label.
    """
    labelled = intensity >= 0
    ce = F.cross_entropy(logits, intensity.clamp(min=0), reduction="none")
    return torch.where(labelled, ce, torch.zeros_like(ce))
