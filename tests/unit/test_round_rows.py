"""What the ServerApp writes per round (fedmer.results.rounds): intensity scores beside the categories."""

from __future__ import annotations

import numpy as np
import torch

from fedmer.config import ExperimentConfig, ModelConfig
from fedmer.data.base import MultimodalDataset
from fedmer.models import build_model
from fedmer.results.rounds import CSV_COLUMNS, round_row
from fedmer.training.loops import evaluate_model


def _data(intensity: bool) -> MultimodalDataset:
    rng = np.random.default_rng(0)
    return MultimodalDataset(
        x=rng.normal(size=(24, 5, 4)).astype(np.float32),
        mask=np.ones((24, 2), bool),
        y=np.arange(24) % 3,
        person=np.arange(24) // 4,
        site=np.zeros(24, np.int64),
        modalities=("speech", "face"),
        feature_slices=((0, 2), (2, 4)),
        class_names=("a", "b", "c"),
        intensity=(np.arange(24) % 2) if intensity else None,
        intensity_names=("normal", "strong") if intensity else (),
    )


def test_intensity_scores_reach_the_round_row_when_the_model_has_the_head() -> None:
    torch.manual_seed(0)
    data = _data(intensity=True)
    model = build_model(
        ModelConfig(hidden=8, intensity_weight=0.5), data.feature_slices, 3, intensity_classes=2
    )
    report = evaluate_model(model, data)
    row, _ = round_row(1, report, None, ExperimentConfig(), 0.0, None)
    assert set(CSV_COLUMNS) <= set(row)
    assert row["intensity_uar"] == report["intensity_uar"] and 0.0 <= row["intensity_uar"] <= 1.0
    assert row["intensity_accuracy"] == report["intensity_accuracy"]


def test_without_an_intensity_head_the_columns_are_empty() -> None:
    torch.manual_seed(0)
    data = _data(intensity=False)
    report = evaluate_model(build_model(ModelConfig(hidden=8), data.feature_slices, 3), data)
    row, _ = round_row(1, report, None, ExperimentConfig(), 0.0, None)
    assert row["intensity_uar"] is None and row["intensity_accuracy"] is None


def test_a_run_whose_trainings_mostly_failed_is_a_failed_run() -> None:
    """Failures, rejections and silent nodes count; budget refusals (a node's policy) do not."""
    from fedmer.results.rounds import RoundReport, run_failure

    ok = RoundReport(1, sampled=4, clients=[{}, {}, {}], failures=["node 1: killed"])
    assert run_failure([ok], 0.5) is None
    bad = RoundReport(2, sampled=4, clients=[{}], rejections=["node 2: non-finite values in w"])  # 2 silent
    assert run_failure([ok, bad], 0.5) is None  # 4 of 8 is not more than half
    assert run_failure([ok, bad], 0.4) == (
        "4 of 8 sampled trainings failed, were rejected or never replied "
        "(more than federation.max_failed_fraction=0.4)"
    )
    refused = RoundReport(3, sampled=2, refusals=["node 3: budget"] * 2)
    assert run_failure([refused], 0.0) is None


def test_a_run_whose_rounds_mostly_kept_the_old_model_is_a_failed_run() -> None:
    """Every client replied, but the strategy made no model (Bulyan below 4f + 3 replies)."""
    from fedmer.results.rounds import RoundReport, run_failure

    why = "Bulyan made no model from 10 accepted update(s) (too few for its assumptions?)"
    stuck = [RoundReport(r, sampled=12, clients=[{}] * 10, aggregate_rejected=why) for r in (1, 2)]
    fine = RoundReport(3, sampled=12, clients=[{}] * 12)
    assert run_failure([*stuck, fine, RoundReport(4, sampled=12, clients=[{}] * 12)], 0.5) is None
    failure = run_failure([*stuck, fine], 0.5)
    assert failure is not None and failure.startswith("2 of 3 rounds produced no new global model")
    assert "Bulyan made no model" in failure
