"""Federated feature standardisation: per-feature mean and std from every client's sums.

A centralised model standardises each input feature with the training set's mean and std;
a federation cannot pool the data, but it can pool *sums*. Each client releases, once
before round 1, the sum over its samples of ``u_i = [xbar_i, qbar_i, c * present_i]``:
``xbar_i`` and ``qbar_i`` are the sample's per-feature means of ``x`` and ``x**2`` over its
frames, ``present_i`` its modality mask, ``c = C / sqrt(M)``. The server adds the clients'
vectors and reads off, per feature, ``mean = sum(xbar) / n`` and
``var = sum(qbar) / n - mean**2`` where ``n`` counts the samples that recorded the
feature's modality (absent modalities are zero columns and count for nothing).

**Without DP** the sums are exact and so are the statistics (those of the pooled training
frames, as a centralised standardiser would compute them).

**Under sample-level DP** it is a Gaussian mechanism: ``[xbar_i, qbar_i]`` is scaled to
L2 norm at most ``C`` (``privacy.stats_clip_norm``), so one sample moves ``sum u_i`` by at
most ``sqrt(2) C`` (add/remove-one), and the client adds ``N(0, (sigma sqrt(2) C)^2)`` to
every coordinate: one release with noise multiplier ``sigma`` and sampling rate 1, which the
node's ledger and accountant compose with its DP-SGD steps. Noisy statistics are made safe
to divide by: a feature's std is floored at twice the noise's std on its mean (its
estimate is not trusted below that), and a count that noise drove below 1 is read as 1.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmer.data.base import MultimodalDataset

__all__ = [
    "FEATURE_STATS_JSON",
    "FeatureStats",
    "StatsRelease",
    "combine_releases",
    "exact_feature_stats",
    "local_release",
    "read_feature_stats",
]

log = logging.getLogger(__name__)

#: File in the run folder holding the statistics the global model standardises with.
FEATURE_STATS_JSON = "feature_stats.json"
#: A std below this (a constant feature) is replaced by 1: dividing would only amplify noise.
MIN_STD = 1e-6


@dataclass(frozen=True)
class StatsRelease:
    """What one client sends: the (possibly noised) sums and how they were protected."""

    sum_mean: np.ndarray  # (F,) sum over samples of each feature's per-sample frame mean
    sum_square: np.ndarray  # (F,) same for the square
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


@dataclass(frozen=True)
class FeatureStats:
    """Per-feature shift and scale for the model's input, plus how they were obtained."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    count: tuple[float, ...]  # per modality, as estimated (noisy under DP)
    clients: tuple[int, ...] = ()  # partitions whose release was used
    noise_multiplier: float = 0.0
    clip_norm: float = math.inf
    floored: tuple[int, ...] = field(default=())  # features whose std was floored or set to 1

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError(f"{len(self.mean)} means for {len(self.std)} stds")
        bad = [i for i, s in enumerate(self.std) if not (math.isfinite(s) and s > 0)]
        if bad or not all(math.isfinite(m) for m in self.mean):
            raise ValueError(f"feature statistics must be finite with std > 0; bad features {bad[:10]}")

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["clip_norm"] = "inf" if math.isinf(self.clip_norm) else self.clip_norm
        return payload

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> FeatureStats:
        fields = {k: payload[k] for k in ("mean", "std", "count")}
        return cls(
            **{k: tuple(float(v) for v in fields[k]) for k in fields},
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
    rng: np.random.Generator,
) -> StatsRelease:
    """One client's release: clipped per-sample vectors summed, plus Gaussian noise if sigma > 0."""
    if noise_multiplier < 0 or math.isnan(noise_multiplier):
        raise ValueError(f"invalid noise_multiplier={noise_multiplier!r}: expected >= 0")
    if noise_multiplier > 0 and not (0 < clip_norm < math.inf):
        raise ValueError(f"invalid clip_norm={clip_norm!r}: a noised release needs a finite C > 0")
    x = data.x.astype(np.float64)
    v = np.concatenate([x.mean(axis=1), (x**2).mean(axis=1)], axis=1)  # (N, 2F)
    clipped = 0
    if math.isfinite(clip_norm):
        norms = np.linalg.norm(v, axis=1)
        factor = np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12))
        clipped = int((factor < 1.0).sum())
        v = v * factor[:, None]
    f, m = x.shape[-1], data.mask.shape[1]
    scale = 1.0 if math.isinf(clip_norm) else clip_norm / math.sqrt(m)
    release = StatsRelease(
        sum_mean=v[:, :f].sum(axis=0),
        sum_square=v[:, f:].sum(axis=0),
        count=data.mask.astype(np.float64).sum(axis=0) * scale,
        clip_norm=float(clip_norm),
        noise_multiplier=float(noise_multiplier),
        clipped=clipped,
    )
    if noise_multiplier == 0.0:
        return release
    std = release.noise_std
    return dataclasses.replace(
        release,
        sum_mean=release.sum_mean + rng.normal(0.0, std, f),
        sum_square=release.sum_square + rng.normal(0.0, std, f),
        count=release.count + rng.normal(0.0, std, m),
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
    s1 = sum(r.sum_mean for r in releases.values())
    s2 = sum(r.sum_square for r in releases.values())
    counts = sum(r.count for r in releases.values()) / first.count_scale
    owner = np.full(len(s1), -1, dtype=np.int64)
    for m, (a, b) in enumerate(feature_slices):
        owner[a:b] = m
    n = np.where(owner >= 0, np.maximum(counts[np.maximum(owner, 0)], 1.0), 1.0)
    mean = np.where(owner >= 0, s1 / n, 0.0)
    var = np.where(owner >= 0, s2 / n - mean**2, 1.0)
    noise_sd_of_mean = first.noise_std * math.sqrt(len(releases)) / n  # per feature
    floor = np.maximum(2.0 * noise_sd_of_mean, MIN_STD)
    std = np.sqrt(np.maximum(var, 0.0))
    floored = np.flatnonzero(std < floor)
    std = np.where(std < floor, np.where(first.noise_std > 0, floor, 1.0), std)
    if len(floored):
        log.info("feature statistics: %d of %d features have std at the floor", len(floored), len(std))
    return FeatureStats(
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        count=tuple(float(c) for c in counts),
        clients=tuple(sorted(releases)),
        noise_multiplier=first.noise_multiplier,
        clip_norm=first.clip_norm,
        floored=tuple(int(i) for i in floored),
    )


def exact_feature_stats(data: MultimodalDataset) -> FeatureStats:
    """The statistics of ``data`` itself, as a centralised trainer (or a shadow model) computes them."""
    release = local_release(data, clip_norm=math.inf, noise_multiplier=0.0, rng=np.random.default_rng(0))
    return combine_releases({0: release}, data.feature_slices)
