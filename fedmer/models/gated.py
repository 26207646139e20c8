"""Adaptive gated modality weighting (MHLT-style), usable with a second intensity output.

A gated multimodal unit (Arevalo et al. 2017) generalised to M modalities: a gate network
looks at every (masked) embedding and the mask at once and emits one score per modality; a
softmax over the present modalities turns the scores into weights (for two modalities this
is GMU's sigmoid ``z`` / ``1 - z``). The fused vector is the weighted sum of per-modality
``tanh`` transforms, so a sample can lean on whichever sensor is informative *for it*.
MHLT pairs this weighting with category and intensity outputs; here the intensity output is
the model's (any fusion can have it, see ``MultimodalEmotionNet``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedmer.models.fusion_base import Fusion, masked_softmax, mlp, present_of, zero_absent

__all__ = ["GatedFusion"]


class GatedFusion(Fusion):
    """``w = softmax_present(G [h_1..h_M, mask])``, ``fused = sum_m w_m tanh(W (h_m + e_m))``."""

    modality_index: Tensor

    def __init__(self, num_modalities: int, hidden: int, num_outputs: int) -> None:
        super().__init__(num_modalities, hidden, num_outputs)
        self.type_embedding = nn.Embedding(num_modalities, hidden)
        self.transform = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(num_modalities * hidden + num_modalities, num_modalities)
        self.head = mlp(hidden, hidden, num_outputs)
        self.register_buffer("modality_index", torch.arange(num_modalities), persistent=False)

    def _gate(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Fused ``(B, H)`` vector and ``(B, M)`` gate weights."""
        present = present_of(mask)
        z = zero_absent(h, present)
        w = masked_softmax(self.gate(torch.cat([z.flatten(1), present.to(h.dtype)], dim=1)), present)
        typed = z + self.type_embedding(self.modality_index.expand(h.shape[0], -1))
        fused = torch.einsum("bm,bmh->bh", w, torch.tanh(self.transform(typed)))
        return fused, w

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        return self.head(self._gate(h, mask)[0])

    def weights(self, h: Tensor, mask: Tensor) -> Tensor:
        """Gate weights ``(B, M)``: sum to 1 over present modalities, 0 if none."""
        return self._gate(h, mask)[1]
