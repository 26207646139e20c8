"""How a trained global model copes with sensors that are missing at test time.

Vehicles lose cameras, patients take off wristbands, RAVDESS has 1,080 audio-only clips:
a model deployed in the field sees masks it rarely trained on. This module scores one
model on the held-out test persons under four kinds of condition:

* ``natural``: the masks as recorded;
* ``removed``: one modality masked out of every sample (mask False and its feature columns
  zeroed through :meth:`MultimodalDataset.with_mask`), one row per modality;
* ``only``: every modality but one masked out (what that sensor alone is worth);
* ``random``: each *present* modality of each sample dropped independently with
  probability ``rate`` (seeded), averaged over ``draws`` draws with the sd reported.

Samples left with no modality at all are still scored (the fusion gives finite logits; a
non-finite one is an error) and counted in ``n_no_modality``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from torch import nn

from fedmer.data.base import MultimodalDataset
from fedmer.posthoc.inference import score

__all__ = [
    "CONDITIONS",
    "RATES",
    "MissingResult",
    "chance_uar",
    "drop_at_random",
    "evaluate_missing",
    "keep_only",
    "remove_modality",
]

log = logging.getLogger(__name__)

RATES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
CONDITIONS: tuple[str, ...] = ("natural", "removed", "only", "random")


@dataclass(frozen=True)
class MissingResult:
    """One condition's scores; ``*_sd`` are sds over ``draws`` random draws (None for one draw)."""

    condition: str
    modality: str | None
    rate: float | None
    draws: int
    n: int
    n_affected: float  # samples whose mask this condition changed (mean over draws)
    n_no_modality: float  # samples left with no modality at all (mean over draws)
    dropped_fraction: float | None  # realised share of present modality slots dropped (random only)
    uar: float
    accuracy: float
    macro_f1: float
    uar_sd: float | None = None
    accuracy_sd: float | None = None
    macro_f1_sd: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _index(data: MultimodalDataset, modality: str) -> int:
    if modality not in data.modalities:
        raise ValueError(f"unknown modality {modality!r}: this dataset has {', '.join(data.modalities)}")
    return data.modalities.index(modality)


def remove_modality(data: MultimodalDataset, modality: str) -> MultimodalDataset:
    """``data`` with ``modality`` masked out of every sample (its columns zeroed); others untouched."""
    mask = data.mask.copy()
    mask[:, _index(data, modality)] = False
    return data.with_mask(mask)


def keep_only(data: MultimodalDataset, modality: str) -> MultimodalDataset:
    """``data`` with every modality but ``modality`` masked out (it stays where it was recorded)."""
    j = _index(data, modality)
    mask = np.zeros_like(data.mask)
    mask[:, j] = data.mask[:, j]
    return data.with_mask(mask)


def drop_at_random(data: MultimodalDataset, rate: float, rng: np.random.Generator) -> MultimodalDataset:
    """Each present modality of each sample dropped independently with probability ``rate``."""
    if not (isinstance(rate, (int, float)) and 0.0 <= rate <= 1.0):
        raise ValueError(f"invalid missing rate {rate!r}: expected a number in [0, 1]")
    keep = rng.random(data.mask.shape) >= rate
    return data.with_mask(data.mask & keep)


def _counts(before: np.ndarray, after: np.ndarray) -> tuple[int, int]:
    return int((before != after).any(axis=1).sum()), int((~after.any(axis=1)).sum())


def _row(
    condition: str,
    modality: str | None,
    rate: float | None,
    reports: Sequence[dict],
    counts: Sequence[tuple[int, int]],
    n: int,
    dropped: float | None = None,
) -> MissingResult:
    def stat(key: str) -> tuple[float, float | None]:
        values = [r[key] for r in reports]
        return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)

    (uar, uar_sd), (acc, acc_sd), (f1, f1_sd) = stat("uar"), stat("accuracy"), stat("macro_f1")
    return MissingResult(
        condition=condition,
        modality=modality,
        rate=rate,
        draws=len(reports),
        n=n,
        n_affected=float(np.mean([c[0] for c in counts])),
        n_no_modality=float(np.mean([c[1] for c in counts])),
        dropped_fraction=dropped,
        uar=uar,
        accuracy=acc,
        macro_f1=f1,
        uar_sd=uar_sd,
        accuracy_sd=acc_sd,
        macro_f1_sd=f1_sd,
    )


def evaluate_missing(
    model: nn.Module,
    data: MultimodalDataset,
    *,
    rates: Sequence[float] = RATES,
    draws: int = 5,
    seed: int = 0,
) -> list[MissingResult]:
    """Score ``model`` on ``data`` under every condition (see the module doc), natural first."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"invalid draws={draws!r}: expected an integer >= 1")
    if len(data) == 0:
        raise ValueError("cannot evaluate missing modalities on an empty dataset")
    for rate in rates:
        if not (isinstance(rate, (int, float)) and 0.0 < rate <= 1.0):
            raise ValueError(f"invalid missing rate {rate!r}: expected a number in (0, 1]")
    n, base = len(data), data.mask
    results = [_row("natural", None, None, [score(model, data)], [_counts(base, base)], n)]
    for condition, transform in (("removed", remove_modality), ("only", keep_only)):
        for m in data.modalities:
            changed = transform(data, m)
            results.append(
                _row(condition, m, None, [score(model, changed)], [_counts(base, changed.mask)], n)
            )
    present_slots = int(base.sum())
    for rate in rates:
        reports, counts, dropped = [], [], []
        for draw in range(draws):
            rng = np.random.default_rng([seed, draw, round(float(rate) * 1_000_000)])
            changed = drop_at_random(data, float(rate), rng)
            reports.append(score(model, changed))
            counts.append(_counts(base, changed.mask))
            dropped.append((present_slots - int(changed.mask.sum())) / max(present_slots, 1))
        results.append(_row("random", None, float(rate), reports, counts, n, float(np.mean(dropped))))
    for r in results:
        log.info(
            "%s %s: UAR %.4f (%d samples, %.1f with no modality)",
            r.condition,
            r.modality or ("" if r.rate is None else f"rate {r.rate:g}"),
            r.uar,
            r.n,
            r.n_no_modality,
        )
    return results


def chance_uar(num_classes: int) -> float:
    """Expected UAR of a guess that ignores the input (any class prior): 1 / number of classes."""
    return 1.0 / num_classes if num_classes > 0 else math.nan
