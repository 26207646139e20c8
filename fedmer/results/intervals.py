"""Intervals for a sweep's cells: does a cell beat chance, does one cell's leakage differ from another's?

A frontier cell is a few runs (seeds) of one setting. Reporting its mean alone invites reading
noise as signal (a single-run attack AUC of 0.73 next to 0.55), so the report states each cell
with a 95% interval and decides from the interval:

* **UAR**: Student-t interval of the mean over the cell's runs (seeds vary the data, the
  partition, the initialisation and the DP noise, so their spread is the run-to-run spread a
  user will see). The cell *beats chance* when the interval's lower end is above chance UAR.
* **Attack AUC**: each run's audit gives an AUC with a bootstrap interval over its members and
  non-members. The cell's interval is around the mean AUC of its target models, with the
  larger of two standard errors: the runs' bootstrap errors combined (``sqrt(sum se_i^2) / k``)
  and the spread between target models (``sd / sqrt(k)``, with the t quantile). Two cells'
  leakage is *distinguishable* when their intervals do not overlap.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from scipy import stats

__all__ = ["Interval", "auc_interval", "distinguishable", "mean_interval"]

#: Interval = (low, high); NaN ends when there is nothing to estimate from.
Interval = tuple[float, float]
_Z95 = 1.959963984540054
_NAN: Interval = (math.nan, math.nan)


def _t95(n: int) -> float:
    return float(stats.t.ppf(0.975, n - 1))


def mean_interval(values: Sequence[float]) -> Interval:
    """95% Student-t interval of the mean of ``values`` (NaN ends for fewer than two values)."""
    known = [float(v) for v in values if v is not None and not math.isnan(v)]
    if len(known) < 2:
        return _NAN
    mean = statistics.fmean(known)
    half = _t95(len(known)) * statistics.stdev(known) / math.sqrt(len(known))
    return mean - half, mean + half


def auc_interval(aucs: Sequence[float], run_intervals: Sequence[Interval]) -> Interval:
    """95% interval of the mean AUC over target models, from their bootstrap intervals and spread.

    One target model: its own bootstrap interval. Several: mean ± the larger of the combined
    bootstrap error (z) and the between-model error (t over ``k - 1`` degrees of freedom).
    """
    pairs = [
        (float(a), (float(lo), float(hi)))
        for a, (lo, hi) in zip(aucs, run_intervals, strict=True)
        if a is not None and not math.isnan(a) and not (math.isnan(lo) or math.isnan(hi))
    ]
    if not pairs:
        return _NAN
    if len(pairs) == 1:
        return pairs[0][1]
    k = len(pairs)
    mean = statistics.fmean(a for a, _ in pairs)
    within = math.sqrt(sum(((hi - lo) / (2 * _Z95)) ** 2 for _, (lo, hi) in pairs)) / k
    between = statistics.stdev(a for a, _ in pairs) / math.sqrt(k)
    half = max(_Z95 * within, _t95(k) * between)
    return mean - half, mean + half


def distinguishable(a: Interval, b: Interval) -> bool | None:
    """True when the intervals do not overlap, False when they do, None when either is unknown."""
    if any(math.isnan(x) for x in (*a, *b)):
        return None
    return a[1] < b[0] or b[1] < a[0]
