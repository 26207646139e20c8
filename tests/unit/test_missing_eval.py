"""Missing modalities at test time: exact masking, drop rates, no-modality samples, the report."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedmer.config import ModelConfig
from fedmer.data.base import MultimodalDataset
from fedmer.models import build_model
from fedmer.posthoc.inference import dataset_logits
from fedmer.posthoc.missing import (
    drop_at_random,
    evaluate_missing,
    keep_only,
    remove_modality,
)
from tests.conftest import TOY_MODALITIES, TOY_SLICES, toy_dataset

MODS, SLICES = TOY_MODALITIES, TOY_SLICES


def _data(n: int = 40, seed: int = 0, mask: np.ndarray | None = None) -> MultimodalDataset:
    rng = np.random.default_rng(seed)
    mask = rng.random((n, 3)) < 0.8 if mask is None else mask
    return toy_dataset(rng.normal(size=(n, 6, 9)), mask)


def _model(fusion: str = "attention") -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(hidden=8, fusion=fusion), SLICES, 4, MODS).eval()


@pytest.mark.parametrize("j", range(3))
def test_removing_a_modality_changes_exactly_that_modality(j: int) -> None:
    data = _data()
    out = remove_modality(data, MODS[j])
    a, b = SLICES[j]
    assert not out.mask[:, j].any() and np.all(out.x[:, :, a:b] == 0)
    others = [k for k in range(3) if k != j]
    assert np.array_equal(out.mask[:, others], data.mask[:, others])
    keep = np.ones(9, bool)
    keep[a:b] = False
    assert np.array_equal(out.x[:, :, keep], data.x[:, :, keep])
    assert np.array_equal(out.y, data.y) and np.array_equal(data.mask, _data().mask)  # input untouched


def test_keep_only_keeps_one_modality_where_it_was_recorded() -> None:
    data = _data()
    out = keep_only(data, "face")
    assert np.array_equal(out.mask[:, 1], data.mask[:, 1]) and not out.mask[:, [0, 2]].any()
    assert np.array_equal(out.x[:, :, 3:5], data.x[:, :, 3:5]) and np.all(
        out.x[:, :, [0, 1, 2, 5, 6, 7, 8]] == 0
    )
    with pytest.raises(ValueError, match="unknown modality 'can'.*speech, face, physio"):
        keep_only(data, "can")


@settings(max_examples=40, deadline=None)
@given(rate=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_random_drop_only_removes_and_hits_the_rate(rate: float, seed: int) -> None:
    # The data's mask must come from a stream independent of the drop's: with the same seed,
    # the same uniforms decide both and the drop rate among present entries is biased.
    data = _data(n=600, seed=20_001)  # outside the range `seed` is drawn from
    out = drop_at_random(data, rate, np.random.default_rng(seed))
    assert not (out.mask & ~data.mask).any()  # never adds a modality
    for j, (a, b) in enumerate(SLICES):
        assert np.all(out.x[~out.mask[:, j], :, a:b] == 0)
    present = int(data.mask.sum())
    dropped = (present - int(out.mask.sum())) / present
    sd = math.sqrt(rate * (1 - rate) / present)
    assert abs(dropped - rate) <= 5 * sd + 1e-12  # binomial: 5 sd, fails ~1 in 3.5 million


def test_rates_are_seeded_and_validated() -> None:
    data = _data()
    a = drop_at_random(data, 0.3, np.random.default_rng(5))
    b = drop_at_random(data, 0.3, np.random.default_rng(5))
    assert np.array_equal(a.mask, b.mask)
    with pytest.raises(ValueError, match="invalid missing rate 1.5"):
        drop_at_random(data, 1.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="invalid missing rate 0"):
        evaluate_missing(_model(), data, rates=(0.0,))
    with pytest.raises(ValueError, match="draws=0"):
        evaluate_missing(_model(), data, draws=0)


@pytest.mark.parametrize("fusion", ["attention", "concat", "late"])
def test_samples_with_no_modality_are_scored_and_counted(fusion: str) -> None:
    mask = np.ones((40, 3), bool)
    mask[:3] = False  # three samples recorded nothing
    mask[3:10, 1] = False  # seven lack face
    data = _data(mask=mask)
    rows = evaluate_missing(_model(fusion), data, rates=(0.5, 1.0), draws=3, seed=1)
    by = {(r.condition, r.modality, r.rate): r for r in rows}
    assert by[("natural", None, None)].n_no_modality == 3 and by[("natural", None, None)].n == 40
    assert by[("removed", "face", None)].n_affected == 30  # 40 minus the 10 without face
    assert by[("removed", "face", None)].n_no_modality == 3
    assert by[("only", "face", None)].n_no_modality == 10
    assert by[("random", None, 1.0)].n_no_modality == 40 and by[("random", None, 1.0)].dropped_fraction == 1.0
    assert by[("random", None, 0.5)].draws == 3 and by[("random", None, 0.5)].uar_sd is not None
    for r in rows:
        assert 0.0 <= r.uar <= 1.0 and r.n == 40
    # a fully blank input still gives finite logits (otherwise dataset_logits raises)
    assert np.isfinite(dataset_logits(_model(fusion), data.with_mask(np.zeros((40, 3), bool)))).all()


def test_the_all_missing_row_is_the_models_blank_prediction() -> None:
    data = _data()
    model = _model("concat")
    blank = dataset_logits(model, data.with_mask(np.zeros_like(data.mask))).argmax(axis=1)
    row = evaluate_missing(model, data, rates=(1.0,), draws=1)[-1]
    assert row.accuracy == pytest.approx(float(np.mean(blank == data.y)))


class _NaNModel(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(x), 4)
        out[~mask.bool().any(dim=1)] = float("nan")
        return out


def test_non_finite_logits_are_an_error_not_a_silent_class_0() -> None:
    mask = np.ones((40, 3), bool)
    mask[7] = False
    with pytest.raises(FloatingPointError, match="first index 7"):
        evaluate_missing(_NaNModel(), _data(mask=mask))


def test_report_files(tmp_path: Path, run_folder: Path) -> None:
    from fedmer.cli import main

    assert (
        main(["missing", str(run_folder), "--out", str(tmp_path), "--draws", "2", "--rates", "0.2", "0.4"])
        == 0
    )
    report = json.loads((tmp_path / "missing.json").read_text())
    with open(tmp_path / "missing.csv") as fh:
        rows = list(csv.DictReader(fh))
    n_mod = len(report["modalities"])
    assert [r["condition"] for r in rows] == ["natural"] + ["removed"] * n_mod + ["only"] * n_mod + [
        "random"
    ] * 2
    assert [float(r["rate"]) for r in rows[-2:]] == [0.2, 0.4]
    assert report["chance_uar"] == pytest.approx(1 / len(report["classes"]))
    assert float(rows[0]["uar"]) == pytest.approx(report["results"][0]["uar"])
    assert (tmp_path / "missing.png").stat().st_size > 0


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedmer.cli import main

    assert main(["missing", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmer missing: no run folder") and err.count("\n") == 1


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.unit.run_folder import make_run_folder

    return make_run_folder(tmp_path_factory.mktemp("missing"))
