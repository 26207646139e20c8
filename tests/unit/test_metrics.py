"""classification_report: hand-computed cases and properties that must hold for any labels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmer.training.metrics import classification_report, confusion_matrix


def test_hand_computed_example() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    r = classification_report(y_true, y_pred, 3)
    assert r["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["per_class_recall"] == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert r["uar"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # F1 = 2TP / (support + predicted): class 0: 4/5, class 1: 2/4, class 2: 2/3
    assert r["macro_f1"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    assert r["n"] == 6


def test_class_absent_everywhere_is_excluded() -> None:
    r = classification_report(np.array([0, 1, 1]), np.array([0, 1, 0]), 4)
    assert r["per_class_recall"] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert r["uar"] == pytest.approx(0.75)  # classes 2 and 3 have no support
    assert r["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)  # F1 of 2 and 3 undefined


def test_predicted_but_unsupported_class_counts_as_zero_f1() -> None:
    r = classification_report(np.array([0, 0]), np.array([0, 1]), 2)
    assert r["uar"] == pytest.approx(0.5)  # recall only over class 0
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)


def test_empty_input_is_all_zero_not_nan() -> None:
    r = classification_report(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 3)
    assert r["accuracy"] == r["uar"] == r["macro_f1"] == 0.0
    assert r["confusion"] == [[0] * 3] * 3


def test_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="length"):
        confusion_matrix(np.array([0, 1]), np.array([0]), 3)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(np.array([0.5]), np.array([0]), 3)


@st.composite
def labelled(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    c = draw(st.integers(1, 6))
    n = draw(st.integers(1, 60))
    labels = st.lists(st.integers(0, c - 1), min_size=n, max_size=n)
    return np.array(draw(labels)), np.array(draw(labels)), c


@settings(max_examples=60, deadline=None)
@given(labelled())
def test_properties(case: tuple[np.ndarray, np.ndarray, int]) -> None:
    y_true, y_pred, c = case
    r = classification_report(y_true, y_pred, c)
    cm = np.array(r["confusion"])
    assert cm.shape == (c, c)
    assert cm.sum() == len(y_true)
    assert r["accuracy"] == pytest.approx(np.trace(cm) / len(y_true))
    support = np.bincount(y_true, minlength=c) > 0
    assert r["uar"] == pytest.approx(np.mean(np.array(r["per_class_recall"])[support]))
    for key in ("accuracy", "uar", "macro_f1"):
        assert 0.0 <= r[key] <= 1.0 and np.isfinite(r[key])
    assert np.array_equal(cm.sum(axis=1), np.bincount(y_true, minlength=c))


@settings(max_examples=40, deadline=None)
@given(labelled())
def test_perfect_predictions_score_one(case: tuple[np.ndarray, np.ndarray, int]) -> None:
    y_true, _, c = case
    r = classification_report(y_true, y_true, c)
    assert r["accuracy"] == r["uar"] == r["macro_f1"] == 1.0
    assert np.count_nonzero(np.array(r["confusion"]) - np.diag(np.diag(r["confusion"]))) == 0


@settings(max_examples=40, deadline=None)
@given(labelled(), st.randoms(use_true_random=False))
def test_sample_order_does_not_matter(case: tuple[np.ndarray, np.ndarray, int], rnd: object) -> None:
    y_true, y_pred, c = case
    perm = np.arange(len(y_true))
    rnd.shuffle(perm)  # type: ignore[attr-defined]
    assert classification_report(y_true, y_pred, c) == classification_report(y_true[perm], y_pred[perm], c)


@settings(max_examples=40, deadline=None)
@given(labelled(), st.permutations(range(6)))
def test_relabelling_classes_permutes_the_report(
    case: tuple[np.ndarray, np.ndarray, int], relabel: list[int]
) -> None:
    """Renaming classes consistently leaves the summary scores unchanged."""
    y_true, y_pred, c = case
    mapping = np.array([r for r in relabel if r < c])
    a = classification_report(y_true, y_pred, c)
    b = classification_report(mapping[y_true], mapping[y_pred], c)
    for key in ("accuracy", "uar", "macro_f1"):
        assert b[key] == pytest.approx(a[key])
    assert [b["per_class_recall"][mapping[k]] for k in range(c)] == pytest.approx(a["per_class_recall"])
