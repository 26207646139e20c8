"""Report intervals: t interval of a mean, combined AUC interval, overlap (property tests)."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmer.results.intervals import auc_interval, distinguishable, mean_interval

values = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=2, max_size=8)


@settings(deadline=None)  # scipy's first t quantile loads its tables
@given(values)
def test_mean_interval_is_centred_on_the_mean_and_contains_it(xs: list[float]) -> None:
    lo, hi = mean_interval(xs)
    mean = statistics.fmean(xs)
    assert lo <= mean + 1e-12 and mean - 1e-12 <= hi
    assert math.isclose((lo + hi) / 2, mean, abs_tol=1e-9)


def test_mean_interval_uses_student_t() -> None:
    lo, hi = mean_interval([0.5, 0.6, 0.7])
    # t(0.975, 2) = 4.303; sd = 0.1; half-width = 4.303 * 0.1 / sqrt(3) = 0.2484
    assert hi - lo == pytest.approx(2 * 0.24841, abs=1e-4)
    assert all(math.isnan(x) for x in mean_interval([0.5]))


@settings(deadline=None)
@given(st.lists(st.tuples(st.floats(0.3, 0.9), st.floats(0.0, 0.2)), min_size=1, max_size=6))
def test_auc_interval_contains_the_mean_and_one_model_keeps_its_own(pairs: list) -> None:
    aucs = [a for a, _ in pairs]
    cis = [(a - w, a + w) for a, w in pairs]
    lo, hi = auc_interval(aucs, cis)
    mean = statistics.fmean(aucs)
    assert lo <= mean + 1e-12 <= hi + 2e-12
    if len(pairs) == 1:
        assert (lo, hi) == cis[0]


def test_auc_interval_narrows_with_more_target_models() -> None:
    one = auc_interval([0.6], [(0.5, 0.7)])
    four = auc_interval([0.6] * 4, [(0.5, 0.7)] * 4)
    assert four[1] - four[0] == pytest.approx((one[1] - one[0]) / 2)  # sqrt(4) target models
    assert all(math.isnan(x) for x in auc_interval([], []))


def test_distinguishable_means_disjoint() -> None:
    assert distinguishable((0.6, 0.7), (0.45, 0.55)) is True
    assert distinguishable((0.5, 0.6), (0.55, 0.7)) is False
    assert distinguishable((math.nan, math.nan), (0.5, 0.6)) is None
