"""``data.face_features``: the face columns a RAVDESS model reads (all 56, or the 28 per-clip means),
followed alike by training (load_clips), the public prior, the exported bundle and ``fedmer predict``."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from fedmer.cli import main
from fedmer.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig
from fedmer.data.base import MultimodalDataset
from fedmer.data.ravdess import (
    CLASS_NAMES,
    FACE_FEATURES,
    INTENSITY_NAMES,
    face_columns,
    load_clips,
    select_face,
    transform_face,
)
from fedmer.edge import bundle_meta, load_bundle, save_bundle
from fedmer.edge.recording import RecordingError, read_face_row
from fedmer.models import build_model_for
from tests.conftest import SHARED_DATA

MEANS = tuple(f for f in FACE_FEATURES if f.endswith("_mean"))
CLIP = "03-01-05-02-01-01-01"  # angry, strong, actor 1


def _cfg(face_features: str) -> ExperimentConfig:
    return ExperimentConfig(
        data=DataConfig(
            name="ravdess", root="/nowhere", face_features=face_features, face_transform="logodds"
        ),
        model=ModelConfig(encoder="means_linear", fusion="sum", prior="face_expressions"),
    )


def _layout(face_width: int, n: int = 8) -> MultimodalDataset:
    """Random data in RAVDESS' layout with ``face_width`` face columns: no files read."""
    rng = np.random.default_rng(0)
    return MultimodalDataset(
        x=rng.normal(size=(n, 20, 84 + face_width)).astype(np.float32),
        mask=np.ones((n, 2), bool),
        y=np.arange(n) % 8,
        person=np.arange(n),
        site=np.zeros(n, np.int64),
        modalities=("speech", "face"),
        feature_slices=((0, 84), (84, 84 + face_width)),
        class_names=CLASS_NAMES,
        intensity=np.zeros(n, np.int64),
        intensity_names=INTENSITY_NAMES,
    )


def _face_csv(path: Path, values: np.ndarray) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*FACE_FEATURES, "file"])
        w.writerow([*(f"{v:.6f}" for v in values), "01-" + CLIP[3:] + ".mp4"])
    return path


def test_the_option_is_validated() -> None:
    assert DataConfig(name="ravdess").face_features == "all"
    assert DataConfig(name="ravdess", face_features="means").face_features == "means"
    with pytest.raises(ConfigError, match="data.face_features"):
        DataConfig(name="ravdess", face_features="stds")
    with pytest.raises(ConfigError, match="only RAVDESS"):
        DataConfig(name="synthetic", face_features="means")
    with pytest.raises(ConfigError, match="data.face_features"):
        face_columns("stds")


def test_means_are_the_28_per_clip_means_in_the_csv_order() -> None:
    assert face_columns("all") == FACE_FEATURES
    assert face_columns("means") == MEANS and len(MEANS) == 28
    expressions = ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")
    assert MEANS[:7] == tuple(f"{e}_mean" for e in expressions)
    values = np.arange(56, dtype=np.float32)
    np.testing.assert_array_equal(select_face(values, MEANS), values[:28])
    np.testing.assert_array_equal(select_face(values, list(FACE_FEATURES)), values)
    with pytest.raises(ValueError, match="unknown face feature"):
        select_face(values, ["pupil_mean"])


def test_the_prior_indexes_the_selected_columns() -> None:
    model = build_model_for(_cfg("means"), _layout(28))
    w = model.encoders[1].proj.weight  # type: ignore[union-attr]
    assert tuple(w.shape) == (8, 28)
    assert w.abs().sum().item() == 8  # one 1 per class
    assert w[CLASS_NAMES.index("happy"), MEANS.index("happiness_mean")].item() == 1.0


@pytest.mark.parametrize("kind", ["all", "means"])
def test_bundle_and_predict_read_the_columns_the_model_was_trained_on(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = _cfg(kind)
    data = _layout(len(face_columns(kind)))
    torch.manual_seed(0)
    model = build_model_for(cfg, data)
    path = save_bundle(tmp_path / "model_bundle.pt", model.state_dict(), bundle_meta(cfg, data))
    meta = load_bundle(path).meta
    assert meta.frontends["face"]["columns"] == list(face_columns(kind))
    assert meta.data["face_features"] == kind

    raw = np.random.default_rng(1).uniform(0.0, 1.0, 56)
    raw[FACE_FEATURES.index("mouth_openness_mean")] = 30.0  # the CSV's mouth openness is in percent
    raw[FACE_FEATURES.index("mouth_openness_std")] = 5.0
    face_csv = _face_csv(tmp_path / "face_features.csv", raw)
    flac = tmp_path / f"{CLIP}.flac"
    t = np.arange(32_000) / 16_000
    soundfile.write(flac, 0.2 * np.sin(2 * np.pi * 180 * t) * np.hanning(len(t)), 16_000, subtype="PCM_16")
    row = read_face_row(meta, face_csv, flac)
    scaled = np.where([f.startswith("mouth_openness") for f in FACE_FEATURES], raw / 100.0, raw)
    expected = transform_face(select_face(scaled.astype(np.float32), face_columns(kind)), "logodds")
    assert row.shape == (len(face_columns(kind)),)
    np.testing.assert_allclose(row, expected, rtol=1e-5, atol=1e-5)
    assert main(["predict", str(path), str(flac), "--face", str(face_csv)]) == 0
    assert "absent" not in capsys.readouterr().out  # the face was read and used

    bad = dataclasses.replace(meta, frontends={**meta.frontends, "face": {"columns": ["pupil_mean"]}})
    with pytest.raises(RecordingError, match="face columns"):
        read_face_row(bad, face_csv, flac)


@pytest.mark.data
def test_load_clips_keeps_the_means_of_the_real_face_features() -> None:
    root = SHARED_DATA
    if not (root / "ravdess" / "face_features.csv").is_file():
        pytest.skip(f"real RAVDESS data not found at {root}")
    base = DataConfig(name="ravdess", root=str(root), modalities="face", complete_only=True)
    every = load_clips(base)
    means = load_clips(dataclasses.replace(base, face_features="means"))
    assert every.x.shape[2] == 56 and means.x.shape[2] == 28
    np.testing.assert_array_equal(means.x, every.x[:, :, :28])
    np.testing.assert_array_equal(means.y, every.y)
