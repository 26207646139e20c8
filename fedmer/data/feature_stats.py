"""Federated feature standardisation: per-feature statistics from every client's sums.

A centralised model standardises its inputs with statistics of the pooled training set; a
federation cannot pool the data, but it can pool *sums*. Each client releases, once before
round 1, the sum over its samples of ``u_i = [m_i, m_i**2, s_i, s_i**2, c * present_i]``:
``m_i`` and ``s_i`` are the sample's per-feature mean and std over its frames, ``present_i``
its modality mask, ``c = C / sqrt(M)``. From the summed vectors the server reads, per
feature, with ``n`` the samples that recorded the feature's modality (absent modalities
count for nothing):

* the **frame** mean and std (what :class:`~fedmer.models.standardizer.InputStandardizer`
  uses): ``mean = sum m / n``, ``var = (sum m**2 + sum s**2) / n - mean**2``;
* the **functional** statistics (what a per-clip model such as
  :class:`~fedmer.models.encoders.FunctionalsEncoder` standardises its per-clip mean and
  std with): the across-sample std of ``m`` and the across-sample mean and std of ``s``.

**Without DP** the sums are exact and so are the statistics. **Under sample-level DP** it is
a Gaussian mechanism: ``[m_i, m_i**2, s_i, s_i**2]`` is scaled to L2 norm at most ``C``
(``privacy.stats_clip_norm``), so one sample moves ``sum u_i`` by at most ``sqrt(2) C``
(add/remove-one), and the client adds ``N(0, (sigma sqrt(2) C)^2)`` to every coordinate:
one release with noise multiplier ``sigma`` and sampling rate 1, which the node's ledger and
accountant compose with its DP-SGD steps. A noisy statistic is used only where it stands
clear of the noise: a feature whose estimated std is below twice the noise's std on a
per-feature average is left as it is (shift 0, scale 1: what ``data.standardize=none``
does), likewise a functional whose spread is below it; a count that noise drove below 1 is
read as 1. With little data per feature the release therefore degrades to no
standardisation rather than to scaling by noise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from fedmer.data.base import MultimodalDataset
from fedmer.records import STATS_SUMS

__all__ = [
    "FeatureStats",
    "StatsRelease",
    "combine_releases",
    "exact_feature_stats",
    "local_release",
    "read_feature_stats",
]

log = logging.getLogger(__name__)

#: A std below this (a constant feature) is replaced by 1: dividing would only amplify noise.
MIN_STD = 1e-6


@dataclass(frozen=True)
class StatsRelease:
    """What one client sends: the (possibly noised) sums and how they were protected."""

    sum_mean: np.ndarray  # (F,) sum over samples of each feature's per-sample frame mean m_i
    sum_mean_sq: np.ndarray  # (F,) sum of m_i ** 2
    sum_std: np.ndarray  # (F,) sum of the per-sample frame std s_i
    sum_std_sq: np.ndarray  # (F,) sum of s_i ** 2
    count: np.ndarray  # (M,) samples that recorded each modality, times c = C / sqrt(M)
    clip_norm: float  # C; inf = not clipped (no DP)
    noise_multiplier: float  # sigma; noise std on every coordinate is sigma * sqrt(2) * C
    clipped: int = 0  # local diagnostic only: samples scaled down (never sent)

    @property
    def count_scale(self) -> float:
        m = len(self.count)
        return 1.0 if math.isinf(self.clip_norm) else self.clip_norm / math.sqrt(m)

    @property
    def noise_std(self) -> float:
        if self.noise_multiplier == 0.0:
            return 0.0
        return self.noise_multiplier * math.sqrt(2.0) * self.clip_norm

    def vector(self) -> np.ndarray:
        """Everything released, as one vector (the Gaussian mechanism's output)."""
        return np.concatenate([self.sum_mean, self.sum_mean_sq, self.sum_std, self.sum_std_sq, self.count])


_TUPLES = ("mean", "std", "mean_sd", "std_mean", "std_sd", "count")


@dataclass(frozen=True)
class FeatureStats:
    """Per-feature statistics of the training data (frame level and per-sample functionals)."""

    mean: tuple[float, ...]  # frame mean
    std: tuple[float, ...]  # frame std
    mean_sd: tuple[float, ...]  # across-sample std of the per-sample mean
    std_mean: tuple[float, ...]  # across-sample mean of the per-sample std
    std_sd: tuple[float, ...]  # across-sample std of the per-sample std
    count: tuple[float, ...]  # per modality, as estimated (noisy under DP)
    clients: tuple[int, ...] = ()  # partitions whose release was used
    noise_multiplier: float = 0.0
    clip_norm: float = math.inf
    floored: tuple[int, ...] = field(default=())  # features left unstandardised (std not above the noise)

    def __post_init__(self) -> None:
        f = len(self.mean)
        if any(len(getattr(self, k)) != f for k in _TUPLES[1:5]):
            raise ValueError(
                f"feature statistics of unequal lengths: {[len(getattr(self, k)) for k in _TUPLES]}"
            )
        for key in ("std", "mean_sd", "std_sd"):
            bad = [i for i, v in enumerate(getattr(self, key)) if not (math.isfinite(v) and v > 0)]
            if bad:
                raise ValueError(
                    f"feature statistics must have {key} > 0 and finite; bad features {bad[:10]}"
                )
        if not all(math.isfinite(v) for k in ("mean", "std_mean") for v in getattr(self, k)):
            raise ValueError("feature statistics must be finite")

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["clip_norm"] = "inf" if math.isinf(self.clip_norm) else self.clip_norm
        return payload

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> FeatureStats:
        return cls(
            **{k: tuple(float(v) for v in payload[k]) for k in _TUPLES},
            clients=tuple(int(c) for c in payload.get("clients", ())),
            noise_multiplier=float(payload.get("noise_multiplier", 0.0)),
            clip_norm=float(payload.get("clip_norm", "inf")),
            floored=tuple(int(i) for i in payload.get("floored", ())),
        )

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")


def read_feature_stats(path: Path) -> FeatureStats:
    """Statistics written by :meth:`FeatureStats.write`; errors name the file."""
    try:
        return FeatureStats.from_json(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a FedMER feature-statistics file ({err!r})") from None


def local_release(
    data: MultimodalDataset,
    *,
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator | None,
) -> StatsRelease:
    """One client's release: clipped per-sample vectors summed, plus Gaussian noise if sigma > 0."""
    if noise_multiplier < 0 or math.isnan(noise_multiplier):
        raise ValueError(f"invalid noise_multiplier={noise_multiplier!r}: expected >= 0")
    if noise_multiplier > 0 and rng is None:
        raise ValueError("a noised release needs a random generator (rng=None given)")
    if noise_multiplier > 0 and not (0 < clip_norm < math.inf):
        raise ValueError(f"invalid clip_norm={clip_norm!r}: a noised release needs a finite C > 0")
    x = data.x.astype(np.float64)
    for m, (a, b) in enumerate(data.feature_slices):  # an absent modality contributes nothing
        x[~data.mask[:, m], :, a:b] = 0.0
    mean, std = x.mean(axis=1), x.std(axis=1)
    v = np.concatenate([mean, mean**2, std, std**2], axis=1)  # (N, 4F)
    clipped = 0
    if math.isfinite(clip_norm):
        norms = np.linalg.norm(v, axis=1)
        factor = np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12))
        clipped = int((factor < 1.0).sum())
        v = v * factor[:, None]
    f, m = x.shape[-1], data.mask.shape[1]
    scale = 1.0 if math.isinf(clip_norm) else clip_norm / math.sqrt(m)
    sums = v.sum(axis=0)
    release = StatsRelease(
        sum_mean=sums[:f],
        sum_mean_sq=sums[f : 2 * f],
        sum_std=sums[2 * f : 3 * f],
        sum_std_sq=sums[3 * f :],
        count=data.mask.astype(np.float64).sum(axis=0) * scale,
        clip_norm=float(clip_norm),
        noise_multiplier=float(noise_multiplier),
        clipped=clipped,
    )
    if noise_multiplier == 0.0:
        return release
    if rng is None:  # unreachable: a noised release without rng is rejected above
        raise ValueError("a noised release needs a random generator (rng=None given)")
    std_noise = release.noise_std
    return dataclasses.replace(
        release,
        sum_mean=release.sum_mean + rng.normal(0.0, std_noise, f),
        sum_mean_sq=release.sum_mean_sq + rng.normal(0.0, std_noise, f),
        sum_std=release.sum_std + rng.normal(0.0, std_noise, f),
        sum_std_sq=release.sum_std_sq + rng.normal(0.0, std_noise, f),
        count=release.count + rng.normal(0.0, std_noise, m),
    )


def combine_releases(
    releases: dict[int, StatsRelease], feature_slices: tuple[tuple[int, int], ...]
) -> FeatureStats:
    """Global per-feature mean and std from the clients' releases (keyed by partition id)."""
    if not releases:
        raise ValueError("no client released feature statistics: cannot standardise")
    first = next(iter(releases.values()))
    kinds = {(r.clip_norm, r.noise_multiplier, r.sum_mean.shape, r.count.shape) for r in releases.values()}
    if len(kinds) != 1:
        raise ValueError(
            f"clients released statistics with different settings or shapes: {sorted(map(str, kinds))}"
        )
    total = {k: sum(getattr(r, k) for r in releases.values()) for k in STATS_SUMS}
    # releases is non-empty, so the sum is an array (never sum()'s start value 0)
    counts = cast(np.ndarray, sum(r.count for r in releases.values())) / first.count_scale
    owner = np.full(len(total["sum_mean"]), -1, dtype=np.int64)
    for m, (a, b) in enumerate(feature_slices):
        owner[a:b] = m
    inside = owner >= 0
    n = np.where(inside, np.maximum(counts[np.maximum(owner, 0)], 1.0), 1.0)
    avg = {k: np.where(inside, v / n, 0.0) for k, v in total.items()}
    mean, std_mean = avg["sum_mean"], avg["sum_std"]
    frame_var = avg["sum_mean_sq"] + avg["sum_std_sq"] - mean**2
    noise_sd = first.noise_std * math.sqrt(len(releases)) / n  # of each per-feature average
    floor = np.maximum(2.0 * noise_sd, MIN_STD)

    def sd_of(var: np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum(np.where(inside, var, 1.0), 0.0))

    # A statistic is used only where it stands clear of the noise on its estimate; elsewhere
    # the feature (or functional) is left as it is: shift 0, scale 1, as without standardising.
    std, mean_sd, std_sd = (
        sd_of(frame_var),
        sd_of(avg["sum_mean_sq"] - mean**2),
        sd_of(avg["sum_std_sq"] - std_mean**2),
    )
    untrusted = std < floor
    if first.noise_std > 0:
        mean, std = np.where(untrusted, 0.0, mean), np.where(untrusted, 1.0, std)
    else:  # exact: only constant features are left unscaled (centred, since their mean is exact)
        std = np.where(untrusted, 1.0, std)
    mean_sd = np.where(untrusted | (mean_sd < floor), std, mean_sd)  # -> scale 1 on the per-clip mean
    flat_std = untrusted | (std_sd < floor)
    std_mean, std_sd = np.where(flat_std, 0.0, std_mean), np.where(flat_std, std, std_sd)  # -> identity
    floored = np.flatnonzero(untrusted)
    if len(floored):
        log.info(
            "feature statistics: %d of %d features left unstandardised (std below %s)",
            len(floored),
            len(std),
            "twice the release noise" if first.noise_std > 0 else "1e-6: constant",
        )

    def tup(a: np.ndarray) -> tuple[float, ...]:
        return tuple(float(v) for v in a)

    return FeatureStats(
        mean=tup(mean),
        std=tup(std),
        mean_sd=tup(mean_sd),
        std_mean=tup(std_mean),
        std_sd=tup(std_sd),
        count=tup(counts),
        clients=tuple(sorted(releases)),
        noise_multiplier=first.noise_multiplier,
        clip_norm=first.clip_norm,
        floored=tuple(int(i) for i in floored),
    )


def exact_feature_stats(data: MultimodalDataset) -> FeatureStats:
    """The statistics of ``data`` itself, as a centralised trainer (or a shadow model) computes them."""
    release = local_release(data, clip_norm=math.inf, noise_multiplier=0.0, rng=None)
    return combine_releases({0: release}, data.feature_slices)
