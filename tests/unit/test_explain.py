"""Explanations: ablation deltas by hand, absent modalities, fusion weights, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from fedmer.config import ModelConfig
from fedmer.data.base import MultimodalDataset
from fedmer.models import build_model
from fedmer.posthoc.explain.attribution import explain, mean_contributions

MODS = ("speech", "face")
SLICES = ((0, 3), (3, 5))


def _data(mask: np.ndarray, seed: int = 0) -> MultimodalDataset:
    n = len(mask)
    rng = np.random.default_rng(seed)
    data = MultimodalDataset(
        x=rng.normal(size=(n, 5, 5)).astype(np.float32),
        mask=np.ones((n, 2), bool),
        y=np.arange(n) % 3,
        person=np.arange(n),
        site=np.zeros(n, np.int64),
        modalities=MODS,
        feature_slices=SLICES,
        class_names=("calm", "happy", "angry"),
    )
    return data.with_mask(mask)


class SpeechOnly(nn.Module):
    """logits = head(mean over time of speech features * speech mask): face is irrelevant."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fusion = nn.Linear(3, 3)
        with torch.no_grad():
            self.fusion.weight.mul_(4.0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fusion(x[:, :, 0:3].mean(dim=1) * mask[:, :1])


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def test_ablation_deltas_match_a_hand_computation() -> None:
    data = _data(np.ones((6, 2), bool))
    model = SpeechOnly()
    w, b = model.fusion.weight.detach().double().numpy(), model.fusion.bias.detach().double().numpy()
    for e in explain(model, data):
        z = w @ data.x[e.index, :, 0:3].astype(np.float64).mean(axis=0) + b
        pred = int(np.argmax(z))
        speech, face = e.contributions
        assert e.predicted_index == pred and e.predicted == data.class_names[pred]
        assert e.probabilities == pytest.approx(tuple(_softmax(z)), abs=1e-6)
        # speech masked out: the head sees zeros, so the logits are the bias
        assert speech.prob_drop == pytest.approx(_softmax(z)[pred] - _softmax(b)[pred], abs=1e-6)
        assert speech.logit_drop == pytest.approx(z[pred] - b[pred], abs=1e-5)
        assert face.prob_drop == 0.0 and face.logit_drop == 0.0  # irrelevant modality: exactly nothing
        assert speech.weight is None and face.weight is None  # this model has no fusion weights
    assert any(abs(e.contributions[0].prob_drop) > 0.05 for e in explain(model, data))  # decisive


def test_absent_modalities_are_reported_absent_not_zero() -> None:
    mask = np.array([[True, False], [False, True], [False, False]])
    model = build_model(ModelConfig(hidden=8, fusion="attention"), SLICES, 3, MODS).eval()
    ex = explain(model, _data(mask))
    for e, row in zip(ex, mask, strict=True):
        for c, present in zip(e.contributions, row, strict=True):
            assert c.present == present
            if not present:
                assert c.prob_drop is None and c.logit_drop is None and c.weight is None
            else:
                assert c.prob_drop is not None and c.weight is not None
    assert ex[2].to_json()["contributions"][0]["present"] is False


def test_attention_weights_sum_to_one_over_present_modalities() -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((30, 2)) < 0.7
    mask[mask.sum(axis=1) == 0, 0] = True
    model = build_model(ModelConfig(hidden=8, fusion="attention"), SLICES, 3, MODS).eval()
    for e in explain(model, _data(mask)):
        weights = [c.weight for c in e.contributions if c.present]
        assert sum(weights) == pytest.approx(1.0, abs=1e-6) and all(0 <= w <= 1 for w in weights)


def test_concat_fusion_has_no_weights_but_still_ablation() -> None:
    model = build_model(ModelConfig(hidden=8, fusion="concat"), SLICES, 3, MODS).eval()
    e = explain(model, _data(np.ones((2, 2), bool)), [1])[0]
    assert e.index == 1 and all(c.weight is None and c.prob_drop is not None for c in e.contributions)


def test_explain_refuses_opacus_wrappers_and_bad_indices() -> None:
    model = SpeechOnly()
    data = _data(np.ones((4, 2), bool))
    with pytest.raises(TypeError, match="GradSampleModule"):
        explain(GradSampleModule(model), data)
    with pytest.raises(ValueError, match="invalid sample index 4.*0..3"):
        explain(model, data, [0, 4])


def test_explaining_needs_no_autograd_and_changes_nothing() -> None:
    model = SpeechOnly()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        explain(model, _data(np.ones((4, 2), bool)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_mean_contributions_group_by_predicted_class() -> None:
    mask = np.ones((12, 2), bool)
    mask[:4, 1] = False
    data = _data(mask)
    ex = explain(SpeechOnly(), data)
    table = mean_contributions(ex, data.class_names)
    assert sum(t["n_predicted"] for t in table.values()) == 12
    for c, t in table.items():
        group = [e for e in ex if e.predicted == c]
        assert t["modalities"]["face"]["n"] == sum(e.contributions[1].present for e in group)
        if t["modalities"]["face"]["n"]:
            assert t["modalities"]["face"]["mean_prob_drop"] == 0.0
        if group:
            mean = np.mean([e.contributions[0].prob_drop for e in group])
            assert t["modalities"]["speech"]["mean_prob_drop"] == pytest.approx(mean)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.unit.run_folder import make_run_folder

    return make_run_folder(tmp_path_factory.mktemp("explain"))


def test_cli_writes_json_and_plot(
    run_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedmer.cli import main

    assert main(["explain", str(run_folder), "--index", "0", "5", "--out", str(tmp_path)]) == 0
    assert "sample 0: predicted" in capsys.readouterr().out
    report = json.loads((tmp_path / "explain.json").read_text())
    assert [s["index"] for s in report["samples"]] == [0, 5]
    table = report["per_class_mean"]["table"]
    assert sum(t["n_predicted"] for t in table.values()) == report["per_class_mean"]["n_samples"]
    assert (tmp_path / "explain.png").stat().st_size > 0
    assert main(["explain", str(run_folder), "--n", "3", "--out", str(tmp_path), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["samples"]) == 3
    assert main(["explain", str(run_folder), "--index", "100000"]) == 2
    assert "invalid sample index 100000" in capsys.readouterr().err
