"""The one in-memory form every FedMER dataset takes.

All modalities share a time axis, so a sample is one packed ``(T, F)`` array whose
feature columns are cut into modality slices, plus a boolean mask saying which
modalities were actually recorded. A single packed tensor keeps Opacus' per-sample
gradient hooks simple (one batch dimension, one input) and lets the same model run
on any subset of modalities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["DatasetSplit", "MultimodalDataset", "concat_datasets"]


@dataclass(frozen=True)
class MultimodalDataset:
    """Samples of packed multimodal sequences with their masks, labels and owners."""

    x: np.ndarray  # (N, T, F) float32; columns of absent modalities are zero
    mask: np.ndarray  # (N, M) bool, M = len(modalities); True = modality present
    y: np.ndarray  # (N,) int64 class index
    person: np.ndarray  # (N,) int64 globally unique person id
    site: np.ndarray  # (N,) int64 site (vehicle / hospital) id
    modalities: tuple[str, ...]
    feature_slices: tuple[tuple[int, int], ...]  # per modality: (start, stop) columns of x
    class_names: tuple[str, ...]
    #: Optional second label (e.g. RAVDESS' normal/strong intensity), (N,) int64; -1 = unlabelled.
    intensity: np.ndarray | None = None
    intensity_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.y)
        if self.intensity is not None and (self.intensity.shape != (n,) or not self.intensity_names):
            raise ValueError(
                f"intensity must have shape ({n},) and come with intensity_names, got "
                f"{self.intensity.shape} and {self.intensity_names!r}"
            )
        if self.x.ndim != 3 or self.x.shape[0] != n:
            raise ValueError(f"x must have shape (N, T, F) with N={n}, got {self.x.shape}")
        if self.mask.shape != (n, len(self.modalities)):
            raise ValueError(f"mask must have shape ({n}, {len(self.modalities)}), got {self.mask.shape}")
        if len(self.feature_slices) != len(self.modalities):
            raise ValueError("feature_slices must give one (start, stop) per modality")
        for arr, name in ((self.person, "person"), (self.site, "site")):
            if arr.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def seq_len(self) -> int:
        return int(self.x.shape[1])

    @property
    def feature_dims(self) -> dict[str, int]:
        """Number of feature columns of each modality."""
        return {m: b - a for m, (a, b) in zip(self.modalities, self.feature_slices, strict=False)}

    def subset(self, index: np.ndarray) -> MultimodalDataset:
        """The samples at ``index`` (an integer array), as a new dataset."""
        index = np.asarray(index, dtype=np.int64)
        return MultimodalDataset(
            x=self.x[index],
            mask=self.mask[index],
            y=self.y[index],
            person=self.person[index],
            site=self.site[index],
            modalities=self.modalities,
            feature_slices=self.feature_slices,
            class_names=self.class_names,
            intensity=None if self.intensity is None else self.intensity[index],
            intensity_names=self.intensity_names,
        )

    def with_mask(self, mask: np.ndarray) -> MultimodalDataset:
        """Same samples with a new modality mask; columns of masked modalities are zeroed."""
        mask = np.asarray(mask, dtype=bool)
        x = self.x.copy()
        for j, (a, b) in enumerate(self.feature_slices):
            x[~mask[:, j], :, a:b] = 0.0
        return MultimodalDataset(
            x=x,
            mask=mask,
            y=self.y,
            person=self.person,
            site=self.site,
            modalities=self.modalities,
            feature_slices=self.feature_slices,
            class_names=self.class_names,
            intensity=self.intensity,
            intensity_names=self.intensity_names,
        )

    def to_tensors(self) -> TensorDataset:
        """``(x float32, mask float32, y int64)`` for a DataLoader."""
        return TensorDataset(
            torch.from_numpy(np.ascontiguousarray(self.x, dtype=np.float32)),
            torch.from_numpy(self.mask.astype(np.float32)),
            torch.from_numpy(self.y.astype(np.int64)),
        )


@dataclass(frozen=True)
class DatasetSplit:
    """Training pool (to be partitioned across clients) and held-out test persons."""

    train: MultimodalDataset
    test: MultimodalDataset

    def __post_init__(self) -> None:
        shared = set(self.train.person.tolist()) & set(self.test.person.tolist())
        if shared:
            raise ValueError(f"test persons also appear in training: {sorted(shared)[:10]}")


def concat_datasets(parts: Sequence[MultimodalDataset]) -> MultimodalDataset:
    """The samples of ``parts`` in order, as one dataset (same modalities, slices and classes)."""
    if not parts:
        raise ValueError("concat_datasets needs at least one dataset")
    first = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        for attr in ("modalities", "feature_slices", "class_names", "intensity_names"):
            if getattr(part, attr) != getattr(first, attr):
                raise ValueError(
                    f"dataset {i} has {attr}={getattr(part, attr)!r} but dataset 0 has "
                    f"{getattr(first, attr)!r}: only datasets of the same layout can be pooled"
                )
        if part.x.shape[1:] != first.x.shape[1:]:
            raise ValueError(
                f"dataset {i} has samples of shape {part.x.shape[1:]}, dataset 0 {first.x.shape[1:]}"
            )
    labelled = [p.intensity is not None for p in parts]
    if any(labelled) and not all(labelled):
        raise ValueError("some datasets have intensity labels and some do not: cannot pool them")
    return MultimodalDataset(
        x=np.concatenate([p.x for p in parts]),
        mask=np.concatenate([p.mask for p in parts]),
        y=np.concatenate([p.y for p in parts]),
        person=np.concatenate([p.person for p in parts]),
        site=np.concatenate([p.site for p in parts]),
        modalities=first.modalities,
        feature_slices=first.feature_slices,
        class_names=first.class_names,
        intensity=np.concatenate([p.intensity for p in parts]) if all(labelled) else None,
        intensity_names=first.intensity_names,
    )
