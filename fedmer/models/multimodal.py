"""The FedMER network: one temporal encoder per modality, then a fusion head.

The input is the packed ``(B, T, F)`` tensor of :class:`fedmer.data.base.MultimodalDataset`
plus its ``(B, M)`` mask, so a single batch dimension flows through every layer (what Opacus'
per-sample gradient hooks expect) and the same network runs on any subset of sensors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedmer.config import ConfigError, ModelConfig
from fedmer.models.encoders import build_encoder
from fedmer.models.fusion import Fusion, build_fusion

__all__ = ["MultimodalEmotionNet", "build_model", "count_parameters"]

logger = logging.getLogger(__name__)


class MultimodalEmotionNet(nn.Module):
    """``forward(x (B,T,F), mask (B,M)) -> logits (B,C)``.

    Columns ``feature_slices[m]`` of ``x`` feed encoder ``m``. The mask decides what the
    fusion may look at; the encoders run on every modality regardless (zeros where absent),
    which keeps shapes static and every parameter touched, so Opacus gets a grad sample for
    each of them in every step.
    """

    def __init__(
        self,
        encoders: Sequence[nn.Module],
        fusion: Fusion,
        feature_slices: Sequence[tuple[int, int]],
    ) -> None:
        super().__init__()
        if len(encoders) != len(feature_slices):
            raise ValueError(f"{len(encoders)} encoders for {len(feature_slices)} feature slices")
        self.encoders = nn.ModuleList(encoders)
        self.fusion = fusion
        self.feature_slices: tuple[tuple[int, int], ...] = tuple((int(a), int(b)) for a, b in feature_slices)
        self.num_features = max(b for _, b in self.feature_slices)

    @property
    def num_modalities(self) -> int:
        return len(self.encoders)

    def _check(self, x: Tensor, mask: Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] < self.num_features:
            raise ValueError(f"x must be (B, T, F>={self.num_features}), got {tuple(x.shape)}")
        if mask.shape != (x.shape[0], self.num_modalities):
            raise ValueError(f"mask must be ({x.shape[0]}, {self.num_modalities}), got {tuple(mask.shape)}")

    def embed(self, x: Tensor, mask: Tensor) -> Tensor:
        """Per-modality embeddings ``(B, M, H)`` (unmasked: the fusion applies the mask)."""
        self._check(x, mask)
        parts = zip(self.encoders, self.feature_slices, strict=True)
        return torch.stack([enc(x[:, :, a:b]) for enc, (a, b) in parts], dim=1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.fusion(self.embed(x, mask), mask)

    @torch.no_grad()
    def modality_weights(self, x: Tensor, mask: Tensor) -> Tensor | None:
        """How much each modality contributed, ``(B, M)``, or None for fusions without weights.

        Attention fusion: its softmax weights (0 for absent modalities, rows of an all-missing
        sample are all 0). Late fusion: uniform over present modalities. Concat: None.
        Runs without autograd so it never feeds Opacus' activation hooks.
        """
        return self.fusion.weights(self.embed(x, mask), mask)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters: the dimension DP-SGD noise is spread over."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(
    cfg: ModelConfig,
    feature_slices: Sequence[tuple[int, int]],
    num_classes: int,
    modalities: Sequence[str] | None = None,
) -> MultimodalEmotionNet:
    """The configured network for a dataset's ``feature_slices`` and class count.

    ``modalities`` (the dataset's names, one per slice) lets a modality-specific encoder
    (``encoders.MODALITY_ENCODERS``, e.g. text tokens) replace ``cfg.encoder``.
    Unknown encoder/fusion names raise :class:`fedmer.config.ConfigError` listing the valid ones.
    Initialisation draws from torch's global RNG: seed it for identical models.
    """
    if not feature_slices:
        raise ConfigError("invalid feature_slices=(): the model needs at least one modality")
    if num_classes < 2:
        raise ConfigError(f"invalid num_classes={num_classes}: expected at least 2")
    if modalities is not None and len(modalities) != len(feature_slices):
        raise ValueError(f"{len(modalities)} modality names for {len(feature_slices)} feature slices")
    names = list(modalities) if modalities is not None else [None] * len(feature_slices)
    encoders = [
        build_encoder(cfg.encoder, b - a, cfg.hidden, modality=m)
        for (a, b), m in zip(feature_slices, names, strict=True)
    ]
    fusion = build_fusion(cfg.fusion, len(feature_slices), cfg.hidden, num_classes)
    model = MultimodalEmotionNet(encoders, fusion, feature_slices)
    logger.info(
        "model %s/%s: %d modalities, hidden=%d, %d classes, %d parameters",
        cfg.encoder,
        cfg.fusion,
        len(feature_slices),
        cfg.hidden,
        num_classes,
        count_parameters(model),
    )
    return model
