"""Fusion of per-modality embeddings ``(B, M, H)`` under a modality mask ``(B, M)`` into logits.

The classic points on the early/late spectrum live here: ``concat`` (feature-level fusion),
``attention`` (additive attention over modality tokens) and ``late`` (decision-level
fusion); the cross-modal attention fusions are in :mod:`fedmer.models.cross_modal` and the
gated one in :mod:`fedmer.models.gated`. This module holds the registry of all of them.

Learned per-modality vectors are ``nn.Embedding`` rows looked up with a batch-expanded index
buffer: Opacus only sees parameters of layers it has per-sample grad samplers for, and the
Embedding sampler needs the index to carry the batch dimension.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fedmer import registry
from fedmer.models.cross_modal import CoAttentionFusion, CrossModalTransformerFusion
from fedmer.models.fusion_base import (
    Fusion,
    masked_softmax,
    mlp,
    present_of,
    uniform_weights,
    zero_absent,
)
from fedmer.models.gated import GatedFusion

__all__ = [
    "FUSIONS",
    "AttentionFusion",
    "CoAttentionFusion",
    "ConcatFusion",
    "CrossModalTransformerFusion",
    "Fusion",
    "GatedFusion",
    "LateFusion",
    "SumFusion",
    "build_fusion",
]

logger = logging.getLogger(__name__)


class ConcatFusion(Fusion):
    """Feature-level fusion: masked embeddings and the mask itself, concatenated, into an MLP.

    Feeding the mask lets the head tell "absent" from "present but near zero".
    """

    def __init__(self, num_modalities: int, hidden: int, num_outputs: int) -> None:
        super().__init__(num_modalities, hidden, num_outputs)
        self.head = mlp(num_modalities * hidden + num_modalities, hidden, num_outputs)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        present = present_of(mask)
        z = zero_absent(h, present).flatten(1)
        return self.head(torch.cat([z, present.to(h.dtype)], dim=1))


class SumFusion(Fusion):
    """Logit-level fusion: each present modality's embedding *is* its logits; they are summed.

    With linear encoders the network is one softmax regression over the concatenated features
    of the present modalities (a product of experts; an absent modality adds nothing). The
    encoders' width is the output count (:attr:`embeds_logits`), whatever ``model.hidden`` says.
    """

    #: build_model gives the encoders ``num_outputs`` columns instead of ``model.hidden``
    embeds_logits = True

    def __init__(self, num_modalities: int, hidden: int, num_outputs: int) -> None:
        super().__init__(num_modalities, hidden, num_outputs)
        if hidden != num_outputs:
            raise ValueError(f"sum fusion needs embeddings of width {num_outputs} (the logits), got {hidden}")

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        # No parameter of its own (each encoder's bias is its modality's intercept): Opacus has
        # per-sample gradients for nn.Linear, not for a bare parameter on a two-input module.
        return zero_absent(h, present_of(mask)).sum(dim=1)


class AttentionFusion(Fusion):
    """Additive attention over modality tokens: ``score_m = v^T tanh(W (h_m + e_m))``.

    ``e_m`` is a learned modality-type embedding, so the scorer can prefer a sensor by
    identity as well as by content. Absent modalities get exactly zero weight; with none
    present every weight is zero and the fused vector is zero (no NaN).
    """

    modality_index: Tensor

    def __init__(self, num_modalities: int, hidden: int, num_outputs: int) -> None:
        super().__init__(num_modalities, hidden, num_outputs)
        self.type_embedding = nn.Embedding(num_modalities, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.score = nn.Linear(hidden, 1, bias=False)
        self.head = mlp(hidden, hidden, num_outputs)
        self.register_buffer("modality_index", torch.arange(num_modalities), persistent=False)

    def _attend(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Fused ``(B, H)`` vector and ``(B, M)`` attention weights."""
        present = present_of(mask)
        b = h.shape[0]
        tokens = zero_absent(h, present) + self.type_embedding(self.modality_index.expand(b, -1))
        scores = self.score(torch.tanh(self.proj(tokens))).squeeze(-1)
        w = masked_softmax(scores, present)
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

    def __init__(self, num_modalities: int, hidden: int, num_outputs: int) -> None:
        super().__init__(num_modalities, hidden, num_outputs)
        self.heads = nn.ModuleList(mlp(hidden, hidden, num_outputs) for _ in range(num_modalities))

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        logits = torch.stack([head(h[:, m]) for m, head in enumerate(self.heads)], dim=1)  # (B, M, C)
        logits = zero_absent(logits, present_of(mask))
        return torch.einsum("bm,bmc->bc", self.weights(h, mask), logits)

    def weights(self, h: Tensor, mask: Tensor) -> Tensor:
        """Uniform weights over present modalities (what the average actually uses)."""
        return uniform_weights(mask, h.dtype)


FusionFactory = Callable[[int, int, int], Fusion]

#: name -> factory ``(num_modalities, hidden, num_outputs) -> Fusion``.
FUSIONS = registry.FUSIONS
for _name, _factory in (
    ("concat", ConcatFusion),
    ("attention", AttentionFusion),
    ("late", LateFusion),
    ("sum", SumFusion),
    ("coattention", CoAttentionFusion),
    ("transformer", CrossModalTransformerFusion),
    ("gated", GatedFusion),
):
    FUSIONS.register(_name, _factory)


def build_fusion(name: str, num_modalities: int, hidden: int, num_outputs: int) -> Fusion:
    """Instantiate a registered fusion; unknown names fail listing the valid ones."""
    factory = FUSIONS.get(name)
    logger.debug("fusion %s: M=%d hidden=%d outputs=%d", name, num_modalities, hidden, num_outputs)
    return factory(num_modalities, hidden, num_outputs)
