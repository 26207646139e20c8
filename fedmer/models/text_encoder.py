"""Encoders for the ``text`` modality, registered so ``build_model`` uses them whatever ``model.encoder``.

Two inputs, told apart by the column count the dataset packs (``fedmer.data.meld``):

* ``in_dim == 1``: hashed token ids (``fedmer.data.text_features``; 0 = padding) ->
  :class:`TokenTextEncoder`: ``nn.Embedding(TEXT_BUCKETS, hidden)``, one residual Conv1d over
  neighbouring tokens, per-token LayerNorm, and attentive pooling over real tokens only.
* ``in_dim > 1``: pretrained sentence vectors (MiniLM, 384 columns) ->
  :class:`SentenceVectorEncoder`, a LayerNorm + two-layer MLP projection.

**Pads are ignored exactly**, not approximately: embeddings, conv outputs and normalised
features are multiplied by the token mask before every step that mixes positions, and pads
get a score of ``-1e9`` (weight exactly 0) in the pooling, so appending pads changes nothing.
It cannot rely on ``padding_idx`` alone: DP-SGD adds noise to the whole embedding gradient,
row 0 included, so the padding row drifts away from zero during private training. LayerNorm
normalises each token on its own; GroupNorm over time would mix pads into the statistics.

**Why 4,096 buckets** (``TEXT_BUCKETS``, defined next to the tokenizer so both agree): Opacus'
per-sample gradient of an Embedding is dense, ``B x buckets x hidden`` floats; measured in
``docs/notes/meld.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedmer.config import ConfigError
from fedmer.data.text_features import TEXT_BUCKETS
from fedmer.models.encoders import contiguous_grad, register_modality_encoder

__all__ = ["PAD_SCORE", "SentenceVectorEncoder", "TokenTextEncoder", "build_text_encoder"]

#: Pooling score of a pad: softmax weight exp(-1e9) is exactly 0 next to any real token.
PAD_SCORE = -1e9


class TokenTextEncoder(nn.Module):
    """``(B, T, 1)`` float token ids -> ``(B, hidden)``; pads (id 0) have no influence."""

    def __init__(self, hidden: int, buckets: int = TEXT_BUCKETS, kernel: int = 3) -> None:
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"invalid kernel={kernel}: expected an odd width (same-length convolution)")
        self.buckets = buckets
        self.embed = nn.Embedding(buckets, hidden, padding_idx=0)
        self.conv = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(hidden)
        self.score = nn.Linear(hidden, 1)

    def token_ids(self, x: Tensor) -> Tensor:
        """``(B, T)`` int64 ids from the packed float column; out-of-range ids are an error."""
        ids = x[..., 0].round().long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.buckets):
            raise ValueError(
                f"token ids must lie in 0..{self.buckets - 1} (TEXT_BUCKETS), got "
                f"{int(ids.min())}..{int(ids.max())}: was the text hashed with another bucket count?"
            )
        return ids

    def sequence(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token features ``(B, T, H)`` (zero at pads) and the ``(B, T)`` real-token mask."""
        ids = self.token_ids(x)
        keep = (ids != 0).unsqueeze(-1).to(self.embed.weight.dtype)
        e = self.embed(ids) * keep
        c = self.act(contiguous_grad(self.conv(e.transpose(1, 2)))).transpose(1, 2) * keep
        return self.norm(e + c) * keep, keep.squeeze(-1)

    def forward(self, x: Tensor, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attentive pooling over real tokens; an all-pad row gives a zero vector, never NaN."""
        h, keep = self.sequence(x)
        s = self.score(h).squeeze(-1).masked_fill(keep == 0, PAD_SCORE)
        w = torch.softmax(s, dim=1)
        pooled = torch.einsum("bt,bth->bh", w * keep, h)
        return (pooled, w * keep) if return_weights else pooled


class SentenceVectorEncoder(nn.Module):
    """``(B, T, D)`` sentence vectors (one frame, or the same vector per frame) -> ``(B, hidden)``.

    LayerNorm first: MiniLM vectors have unit norm, so each coordinate is ~0.05 and would
    start the projection near zero; per-sample normalisation keeps DP-SGD's per-sample bound.
    """

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x.mean(dim=1)))


@register_modality_encoder("text")
def build_text_encoder(in_dim: int, hidden: int) -> nn.Module:
    """Token ids (one column) or sentence vectors (several columns)."""
    if in_dim < 1:
        raise ConfigError(f"invalid text input width {in_dim}: expected 1 (token ids) or a vector width")
    return TokenTextEncoder(hidden) if in_dim == 1 else SentenceVectorEncoder(in_dim, hidden)
