"""The FedMER network: one temporal encoder per modality, a fusion head, and its objective.

The input is the packed ``(B, T, F)`` tensor of :class:`fedmer.data.base.MultimodalDataset`
plus its ``(B, M)`` mask, so a single batch dimension flows through every layer (what Opacus'
per-sample gradient hooks expect) and the same network runs on any subset of sensors.
The network also owns what it is trained for (``model.*`` of the config): the optional
intensity output, the optional cross-modal auxiliary objective and modality dropout, so
every training loop that calls :meth:`MultimodalEmotionNet.sample_losses` trains the same thing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmer.config import ConfigError, ModelConfig
from fedmer.data.feature_stats import FeatureStats
from fedmer.models.encoders import build_encoder
from fedmer.models.fusion import FUSIONS, Fusion, build_fusion
from fedmer.models.fusion_base import present_of
from fedmer.models.objectives import AuxObjective, build_aux_objective, intensity_loss
from fedmer.models.standardizer import InputStandardizer

if TYPE_CHECKING:
    from fedmer.config import ExperimentConfig
    from fedmer.data.base import MultimodalDataset

__all__ = ["ModelOutput", "MultimodalEmotionNet", "build_model", "build_model_for", "count_parameters"]

logger = logging.getLogger(__name__)


class _FunctionalStatsEncoder(Protocol):
    """An encoder with per-clip functional statistics (e.g. ``FunctionalsEncoder``), found by duck typing."""

    def enable_functional_stats(self) -> None: ...

    def set_functional_stats(self, shift: Tensor, scale: Tensor) -> None: ...


@dataclass(frozen=True)
class ModelOutput:
    """Everything one forward pass produces, for losses that need more than the logits."""

    logits: Tensor  # (B, C) emotion categories
    intensity_logits: Tensor | None  # (B, K) intensity levels, None without an intensity head
    embeddings: Tensor  # (B, M, H) per-modality embeddings (absent modalities: encoder of zeros)
    present: Tensor  # (B, M) bool, the mask actually used (after modality dropout)


class MultimodalEmotionNet(nn.Module):
    """``forward(x (B,T,F), mask (B,M)) -> logits (B,C)``; :meth:`outputs` gives the rest.

    Columns ``feature_slices[m]`` of ``x`` feed encoder ``m``; an absent modality's columns
    are replaced by zeros first, so garbage in a missing sensor reaches no layer. The encoders
    run on every modality regardless, which keeps shapes static and every parameter touched,
    so Opacus gets a grad sample for each of them in every step. With ``intensity_classes``
    the fusion emits ``C + K`` columns: categories, then intensity levels, from one shared
    fused representation; without it no intensity parameter exists.

    In training mode, ``modality_dropout`` drops each present modality of each sample with
    that probability (torch's global RNG, so ``seed_everything`` makes it reproducible): the
    dropped modality's mask entry is cleared, which both zeroes its input columns and hides
    its embedding from the fusion, exactly as if the sensor had not recorded. Per-sample and
    data-independent, it leaves DP-SGD's per-sample sensitivity bound untouched.
    """

    def __init__(
        self,
        encoders: Sequence[nn.Module],
        fusion: Fusion,
        feature_slices: Sequence[tuple[int, int]],
        num_classes: int,
        *,
        intensity_classes: int = 0,
        intensity_weight: float = 0.0,
        aux: AuxObjective | None = None,
        aux_weight: float = 0.0,
        modality_dropout: float = 0.0,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        if len(encoders) != len(feature_slices):
            raise ValueError(f"{len(encoders)} encoders for {len(feature_slices)} feature slices")
        if fusion.num_outputs != num_classes + intensity_classes:
            raise ValueError(
                f"fusion has {fusion.num_outputs} outputs, expected {num_classes} classes + "
                f"{intensity_classes} intensity levels"
            )
        if not 0.0 <= modality_dropout < 1.0:
            raise ValueError(f"modality_dropout={modality_dropout!r}: expected [0, 1)")
        self.encoders = nn.ModuleList(encoders)
        self.fusion = fusion
        self.aux = aux
        self.feature_slices: tuple[tuple[int, int], ...] = tuple((int(a), int(b)) for a, b in feature_slices)
        self.num_features = max(b for _, b in self.feature_slices)
        self.num_classes = num_classes
        self.intensity_classes = intensity_classes
        self.intensity_weight = float(intensity_weight)
        self.aux_weight = float(aux_weight)
        self.modality_dropout = float(modality_dropout)
        # data.standardize=federated: (x - mean) / std as the first, untrained layer
        self.standardizer = InputStandardizer(self.num_features) if standardize else None
        for enc in self.encoders if standardize else ():
            if hasattr(enc, "enable_functional_stats"):
                cast(_FunctionalStatsEncoder, enc).enable_functional_stats()

    def set_feature_stats(self, stats: FeatureStats) -> None:
        """Standardise inputs (and per-clip functionals, for encoders that have them) with ``stats``.

        Encoders see standardised frames, so their functional statistics are handed over in
        those units: for ``z = (x - mean) / std`` the per-sample mean has across-sample std
        ``mean_sd / std`` (and mean 0), the per-sample std has mean ``std_mean / std`` and
        std ``std_sd / std``.
        """
        if self.standardizer is None:
            raise ValueError("this model was built without an input standardiser (data.standardize=none)")
        self.standardizer.set_stats(stats)
        frame_std = torch.tensor(stats.std, dtype=torch.float32)
        for enc, (a, b) in zip(self.encoders, self.feature_slices, strict=True):
            if not hasattr(enc, "set_functional_stats"):
                continue
            sd = frame_std[a:b]
            mean_sd, std_mean, std_sd = (
                torch.tensor(getattr(stats, k)[a:b], dtype=torch.float32)
                for k in ("mean_sd", "std_mean", "std_sd")
            )
            shift = torch.cat([torch.zeros(b - a), std_mean / sd])
            scale = torch.cat([sd / mean_sd, sd / std_sd])
            cast(_FunctionalStatsEncoder, enc).set_functional_stats(shift, scale)

    @property
    def num_modalities(self) -> int:
        return len(self.encoders)

    def _check(self, x: Tensor, mask: Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] < self.num_features:
            raise ValueError(f"x must be (B, T, F>={self.num_features}), got {tuple(x.shape)}")
        if mask.shape != (x.shape[0], self.num_modalities):
            raise ValueError(f"mask must be ({x.shape[0]}, {self.num_modalities}), got {tuple(mask.shape)}")

    def embed(self, x: Tensor, mask: Tensor) -> Tensor:
        """Per-modality embeddings ``(B, M, H)``; absent modalities encode all-zero input."""
        self._check(x, mask)
        present = present_of(mask)
        if self.standardizer is not None:
            x = self.standardizer(x)
        parts = []
        for m, (enc, (a, b)) in enumerate(zip(self.encoders, self.feature_slices, strict=True)):
            xm = x[:, :, a:b]
            parts.append(enc(torch.where(present[:, m, None, None], xm, torch.zeros_like(xm))))
        return torch.stack(parts, dim=1)

    def drop_modalities(self, present: Tensor) -> Tensor:
        """Training only: clear each True entry of ``present`` with probability ``modality_dropout``."""
        if not (self.training and self.modality_dropout > 0):
            return present
        keep = torch.rand(present.shape, device=present.device) >= self.modality_dropout
        return present & keep

    def outputs(self, x: Tensor, mask: Tensor) -> ModelOutput:
        """Category and intensity logits, embeddings and the mask used, in one pass."""
        self._check(x, mask)
        present = self.drop_modalities(present_of(mask))
        h = self.embed(x, present)
        out = self.fusion(h, present)
        c = self.num_classes
        intensity = out[:, c:] if self.intensity_classes else None
        return ModelOutput(logits=out[:, :c], intensity_logits=intensity, embeddings=h, present=present)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.outputs(x, mask).logits

    def sample_losses(self, x: Tensor, mask: Tensor, y: Tensor, intensity: Tensor | None = None) -> Tensor:
        """The training loss of each sample, ``(B,)``; the batch loss is its mean.

        ``CE(category) + intensity_weight * CE(intensity; 0 if unlabelled) + aux_weight * aux``:
        every term depends on its own sample only, as DP-SGD's per-sample clipping requires.
        """
        out = self.outputs(x, mask)
        loss = F.cross_entropy(out.logits, y, reduction="none")
        if out.intensity_logits is not None:
            labels = intensity if intensity is not None else torch.full_like(y, -1)
            loss = loss + self.intensity_weight * intensity_loss(out.intensity_logits, labels)
        if self.aux is not None:
            loss = loss + self.aux_weight * self.aux(out.embeddings, out.present, y)
        return loss

    @torch.no_grad()
    def intensity_logits(self, x: Tensor, mask: Tensor) -> Tensor | None:
        """``(B, K)`` intensity logits, or None without an intensity head (no autograd)."""
        return self.outputs(x, mask).intensity_logits

    @torch.no_grad()
    def modality_weights(self, x: Tensor, mask: Tensor) -> Tensor | None:
        """How much each modality contributed, ``(B, M)``, or None for fusions without weights.

        Attention/transformer fusion: pooling softmax weights; gated: gate weights;
        coattention: mean of its early pooling and late averaging weights; late: uniform
        over present modalities; concat: None. Absent modalities get 0, an all-missing
        sample a row of 0. Runs without autograd so it never feeds Opacus' activation hooks,
        and on ``mask`` as given (no modality dropout).
        """
        return self.fusion.weights(self.embed(x, mask), present_of(mask))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters: the dimension DP-SGD noise is spread over."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(
    cfg: ModelConfig,
    feature_slices: Sequence[tuple[int, int]],
    num_classes: int,
    modalities: Sequence[str] | None = None,
    *,
    intensity_classes: int = 0,
    standardize: bool = False,
) -> MultimodalEmotionNet:
    """The configured network for a dataset's ``feature_slices`` and class count.

    ``modalities`` (the dataset's names, one per slice) lets a modality-specific encoder
    (``encoders.MODALITY_ENCODERS``, e.g. text tokens) replace ``cfg.encoder``.
    ``intensity_classes`` (the dataset's intensity levels) is needed iff
    ``cfg.intensity_weight > 0``; prefer :func:`build_model_for`, which reads it from the data.
    ``standardize`` adds an :class:`InputStandardizer` (identity until its statistics are set).
    Unknown names raise :class:`fedmer.config.ConfigError` listing the valid ones.
    Initialisation draws from torch's global RNG: seed it for identical models.
    """
    if not feature_slices:
        raise ConfigError("invalid feature_slices=(): the model needs at least one modality")
    if num_classes < 2:
        raise ConfigError(f"invalid num_classes={num_classes}: expected at least 2")
    if modalities is not None and len(modalities) != len(feature_slices):
        raise ValueError(f"{len(modalities)} modality names for {len(feature_slices)} feature slices")
    intensity_weight = float(cfg.intensity_weight)
    if intensity_weight > 0 and intensity_classes < 2:
        raise ConfigError(
            f"invalid model.intensity_weight={intensity_weight!r}: an intensity head needs >= 2 "
            f"intensity levels, got {intensity_classes}; set model.intensity_weight=0 or use a "
            "dataset with intensity labels"
        )
    k = intensity_classes if intensity_weight > 0 else 0
    names = list(modalities) if modalities is not None else [None] * len(feature_slices)
    # a fusion that sums logits (``sum``) takes embeddings as wide as its output
    width = num_classes + k if getattr(FUSIONS.get(cfg.fusion), "embeds_logits", False) else cfg.hidden
    encoders = [
        build_encoder(cfg.encoder, b - a, width, modality=m)
        for (a, b), m in zip(feature_slices, names, strict=True)
    ]
    m = len(feature_slices)
    fusion = build_fusion(cfg.fusion, m, width, num_classes + k)
    aux = build_aux_objective(cfg.aux_loss, m, width, num_classes)
    model = MultimodalEmotionNet(
        encoders,
        fusion,
        feature_slices,
        num_classes,
        intensity_classes=k,
        intensity_weight=intensity_weight,
        aux=aux,
        aux_weight=float(cfg.aux_weight),
        modality_dropout=float(cfg.modality_dropout),
        standardize=standardize,
    )
    logger.info(
        "model %s/%s (aux %s, intensity levels %d): %d modalities, hidden=%d, %d classes, %d parameters",
        cfg.encoder,
        cfg.fusion,
        cfg.aux_loss,
        k,
        m,
        width,
        num_classes,
        count_parameters(model),
    )
    return model


def build_model_for(cfg: ExperimentConfig, data: MultimodalDataset) -> MultimodalEmotionNet:
    """The configured network for ``data`` (its slices, modalities, classes, intensity levels).

    Fails with a :class:`ConfigError` naming ``model.intensity_weight`` and ``data.name``
    when an intensity head is asked for on a dataset without intensity labels.
    """
    if cfg.model.intensity_weight > 0 and len(data.intensity_names) < 2:
        raise ConfigError(
            f"invalid model.intensity_weight={cfg.model.intensity_weight!r} with data.name="
            f"{cfg.data.name!r}: that dataset has no intensity labels; set model.intensity_weight=0 "
            "or choose a dataset that labels intensity (data.name=ravdess)"
        )
    model = build_model(
        cfg.model,
        data.feature_slices,
        data.num_classes,
        data.modalities,
        intensity_classes=len(data.intensity_names),
        standardize=cfg.data.standardize != "none",
    )
    if cfg.model.prior != "none":  # a public starting point (fedmer.models.prior): no data read
        from fedmer.data.ravdess import face_columns
        from fedmer.models.prior import apply_prior

        apply_prior(
            model,
            cfg.model.prior,
            modalities=data.modalities,
            class_names=data.class_names,
            face_features=face_columns(cfg.data.face_features),
        )
    return model
