"""Cross-modal attention fusions: co-attention + late fusion, and a cross-modal transformer.

Both treat each modality's embedding as a token that attends to the *other* present
modalities. Attention is built from ``nn.Linear`` (Opacus has per-sample grad samplers for
it, and it handles the token dimension) rather than ``opacus.layers.DPMultiheadAttention``:
the cross-modal mask here excludes a token's own modality and every absent one, so a token
can have no key at all (one present modality), where a stock softmax over all ``-inf``
scores gives NaN; :func:`masked_softmax` gives that row zero weights instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fedmer.models.fusion_base import Fusion, masked_softmax, mlp, present_of, uniform_weights, zero_absent

__all__ = ["CoAttentionFusion", "CrossModalTransformerFusion", "ModalityCrossAttention"]


def _heads(hidden: int, preferred: int = 4) -> int:
    """Largest head count <= ``preferred`` dividing ``hidden``."""
    return next(h for h in range(min(preferred, hidden), 0, -1) if hidden % h == 0)


class ModalityCrossAttention(nn.Module):
    """Multi-head scaled dot-product attention of each modality token over the others.

    Token ``m`` may attend to token ``n`` only if ``n != m`` and ``n`` is present, so what a
    modality takes in is strictly cross-modal, and absent modalities are never read.
    """

    others: Tensor

    def __init__(self, num_modalities: int, hidden: int, heads: int | None = None) -> None:
        super().__init__()
        self.heads = heads or _heads(hidden)
        if hidden % self.heads:
            raise ValueError(f"hidden={hidden} is not divisible by heads={self.heads}")
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        others = ~torch.eye(num_modalities, dtype=torch.bool)
        self.register_buffer("others", others, persistent=False)

    def forward(self, tokens: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """``tokens (B, M, H)``, bool ``present (B, M)`` -> context ``(B, M, H)``, map ``(B, M, M)``.

        The map is the head-averaged attention of query ``m`` (row) over keys ``n`` (column).
        """
        b, m, h = tokens.shape
        d = h // self.heads
        q, k, v = self.qkv(tokens).view(b, m, 3, self.heads, d).permute(2, 0, 3, 1, 4)  # each (B, h, M, d)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, heads, M, M)
        allowed = (self.others[None, None] & present[:, None, None, :]).expand_as(scores)
        attn = masked_softmax(scores, allowed)
        context = (attn @ v).transpose(1, 2).reshape(b, m, h)
        return self.out(context), attn.mean(dim=1)


class _TokenFusion(Fusion):
    """Shared pieces: typed modality tokens and an attentive pool over present tokens."""

    modality_index: Tensor

    def __init__(self, num_modalities: int, hidden: int, num_outputs: int) -> None:
        super().__init__(num_modalities, hidden, num_outputs)
        self.type_embedding = nn.Embedding(num_modalities, hidden)
        self.cross = ModalityCrossAttention(num_modalities, hidden)
        self.pool_score = nn.Linear(hidden, 1)
        self.register_buffer("modality_index", torch.arange(num_modalities), persistent=False)

    def tokens(self, h: Tensor, present: Tensor) -> Tensor:
        """Masked embeddings plus a learned modality-type vector, ``(B, M, H)``."""
        return zero_absent(h, present) + self.type_embedding(self.modality_index.expand(h.shape[0], -1))

    def pool(self, z: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """Attentive pool over present tokens: fused ``(B, H)`` and weights ``(B, M)``."""
        w = masked_softmax(self.pool_score(z).squeeze(-1), present)
        return torch.einsum("bm,bmh->bh", w, zero_absent(z, present)), w


class CoAttentionFusion(_TokenFusion):
    """Co-attention early fusion plus late fusion, after Zhao et al. (Interspeech 2022).

    Early branch: each modality attends to the others (``ModalityCrossAttention``), the
    co-attended tokens ``LayerNorm(t_m + context_m)`` are pooled and classified. Late branch:
    one classifier per unimodal embedding, averaged over present modalities. The output is
    the mean of the two branches' logits (a fixed average: a learned scalar mix would be a
    bare ``nn.Parameter`` outside any layer, which Opacus cannot compute per-sample grads for).
    """

    def __init__(self, num_modalities: int, hidden: int, num_outputs: int) -> None:
        super().__init__(num_modalities, hidden, num_outputs)
        self.norm = nn.LayerNorm(hidden)
        self.early_head = mlp(hidden, hidden, num_outputs)
        self.late_heads = nn.ModuleList(mlp(hidden, hidden, num_outputs) for _ in range(num_modalities))

    def _branches(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        present = present_of(mask)
        t = self.tokens(h, present)
        context, _ = self.cross(t, present)
        fused, w_early = self.pool(self.norm(t + context), present)
        unimodal = zero_absent(h, present)
        late = torch.stack([head(unimodal[:, m]) for m, head in enumerate(self.late_heads)], dim=1)
        w_late = uniform_weights(mask, h.dtype)
        late_logits = torch.einsum("bm,bmc->bc", w_late, zero_absent(late, present))
        return self.early_head(fused), late_logits, w_early, w_late

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        early, late, _, _ = self._branches(h, mask)
        return 0.5 * (early + late)

    def weights(self, h: Tensor, mask: Tensor) -> Tensor:
        """Each modality's share: half its early pooling weight, half its late-average weight."""
        _, _, w_early, w_late = self._branches(h, mask)
        return 0.5 * (w_early + w_late)


class CrossModalTransformerFusion(_TokenFusion):
    """One pre-LayerNorm cross-modal transformer block over modality tokens, after MemoCMT.

    ``x = t + CrossAttn(LN(t))``, ``x = x + MLP(LN(x))``, then an attentive pool over present
    modalities and a classifier. Khan et al. (2024) cross-attend two modality sequences;
    here every present modality cross-attends to all other present ones, with one block
    (DP-SGD noise grows with the parameter count, and M <= 5 tokens need little depth).
    """

    def __init__(self, num_modalities: int, hidden: int, num_outputs: int) -> None:
        super().__init__(num_modalities, hidden, num_outputs)
        self.norm_attn = nn.LayerNorm(hidden)
        self.norm_mlp = nn.LayerNorm(hidden)
        self.mlp = mlp(hidden, 2 * hidden, hidden)
        self.norm_out = nn.LayerNorm(hidden)
        self.head = mlp(hidden, hidden, num_outputs)

    def _encode(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        present = present_of(mask)
        x = self.tokens(h, present)
        x = x + self.cross(self.norm_attn(x), present)[0]
        x = x + self.mlp(self.norm_mlp(x))
        return self.pool(self.norm_out(x), present)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        return self.head(self._encode(h, mask)[0])

    def weights(self, h: Tensor, mask: Tensor) -> Tensor:
        """Pooling weights ``(B, M)``: sum to 1 over present modalities, 0 if none."""
        return self._encode(h, mask)[1]
