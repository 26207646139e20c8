"""Edge deployment: the self-contained bundle, ONNX/TorchScript parity, ``fedmer predict``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from fedmer.cli import main
from fedmer.config import DataConfig, ExperimentConfig, FederationConfig, ModelConfig
from fedmer.data.base import MultimodalDataset
from fedmer.data.feature_stats import exact_feature_stats
from fedmer.data.ravdess import CLASS_NAMES, INTENSITY_NAMES
from fedmer.edge import BundleError, bundle_meta, load_bundle, open_bundle, save_bundle
from fedmer.edge.export import FLOAT_TOLERANCE, OnnxModel, export_model, sample_inputs
from fedmer.models import build_model_for
from tests.conftest import SHARED_DATA, toy_dataset

SR = 16_000
RAVDESS_CFG = ExperimentConfig(
    data=DataConfig(name="ravdess", root="/nowhere", standardize="federated"), model=ModelConfig(hidden=8)
)


def ravdess_layout(n: int = 16, seed: int = 0) -> MultimodalDataset:
    """Random data in RAVDESS' layout (84 speech + 56 face columns, 20 frames): no files read."""
    rng = np.random.default_rng(seed)
    return MultimodalDataset(
        x=rng.normal(size=(n, 20, 140)).astype(np.float32),
        mask=np.ones((n, 2), bool),
        y=np.arange(n) % 8,
        person=np.arange(n),
        site=np.zeros(n, np.int64),
        modalities=("speech", "face"),
        feature_slices=((0, 84), (84, 140)),
        class_names=CLASS_NAMES,
        intensity=np.zeros(n, np.int64),
        intensity_names=INTENSITY_NAMES,
    )


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    data = ravdess_layout()
    model = build_model_for(RAVDESS_CFG, data)
    model.set_feature_stats(exact_feature_stats(data))  # non-trivial standardiser buffers
    path = tmp_path_factory.mktemp("bundle") / "model_bundle.pt"
    return save_bundle(path, model.state_dict(), bundle_meta(RAVDESS_CFG, data, {"epsilon_max": 3.5}))


def tone(path: Path, seconds: float = 2.0, rate: int = SR, f0: float = 180.0) -> Path:
    """A voiced-sounding test signal: a vibrato tone with harmonics and a fade."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (f0 * t + 3 * np.sin(2 * np.pi * 5 * t))
    x = sum(0.2 / k * np.sin(k * phase) for k in range(1, 5)) * np.hanning(len(t))
    soundfile.write(path, x, rate, subtype="PCM_16")
    return path


def test_bundle_round_trip(bundle_path: Path) -> None:
    b = load_bundle(bundle_path)
    assert b.meta.class_names == CLASS_NAMES and b.meta.modalities == ("speech", "face")
    assert b.meta.feature_dims == {"speech": 84, "face": 56} and b.meta.seq_len == 20
    assert b.meta.frontends["speech"]["kind"] == "logmel" and b.meta.frontends["speech"]["sr"] == SR
    assert len(b.meta.frontends["face"]["columns"]) == 56
    assert b.meta.standardize and b.model.standardizer is not None
    assert float(b.model.standardizer.scale.std()) > 0  # the statistics travelled, not the identity
    assert b.meta.privacy["statement"]["mode"] == "sample" and b.meta.privacy["final"]["epsilon_max"] == 3.5
    x, mask = sample_inputs(b, batch=8)
    again = load_bundle(save_bundle(bundle_path.with_name("copy.pt"), b.model.state_dict(), b.meta))
    with torch.no_grad():
        assert torch.equal(b.model(x, mask), again.model(x, mask))


def test_bundle_refuses_bare_state_dict_and_mismatched_weights(tmp_path: Path, bundle_path: Path) -> None:
    b = load_bundle(bundle_path)
    torch.save(b.model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(BundleError, match="not a FedMER model bundle"):
        load_bundle(tmp_path / "model.pt")
    with pytest.raises(BundleError, match="written before bundles"):
        open_bundle(tmp_path)
    wrong = bundle_meta(RAVDESS_CFG, ravdess_layout()).__class__(
        **{**vars(b.meta), "class_names": ("a", "b")}
    )
    with pytest.raises(BundleError, match="do not fit"):
        save_bundle(tmp_path / "bad.pt", b.model.state_dict(), wrong)


def test_run_model_loads_without_any_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's recorder writes the bundle; loading it back never touches a data loader."""
    import fedmer.data.registry as registry
    import fedmer.results.reader as reader
    from fedmer.results.recorder import RunRecorder

    cfg = ExperimentConfig(
        data=DataConfig(persons_per_site=2, test_persons_per_site=1, sequences_per_person=4, seq_len=8),
        model=ModelConfig(hidden=8),
        federation=FederationConfig(num_clients=2, num_rounds=1),
    )
    torch.manual_seed(0)
    model = build_model_for(cfg, registry.load_split(cfg).test)
    summary = RunRecorder(tmp_path / "run", cfg).finish(model.state_dict(), {})
    assert summary["files"]["bundle"] == "model_bundle.pt"

    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("the data loader was called")

    for target in (registry, reader):
        monkeypatch.setattr(target, "load_split", no_data)
    monkeypatch.setattr(registry, "_split", no_data)
    loaded = reader.load_run_model(reader.load_run(tmp_path / "run"))
    x, mask = (
        torch.randn(3, 8, model.num_features),
        torch.tensor([[1.0, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]]),
    )
    with torch.no_grad():
        assert torch.allclose(loaded(x, mask), model.eval()(x, mask))
    assert open_bundle(tmp_path / "run").meta.modalities == ("speech", "face", "physio", "can")


def test_onnx_parity_float_and_int8(tmp_path: Path, bundle_path: Path) -> None:
    b = load_bundle(bundle_path)
    report = export_model(b, tmp_path, int8=True, torchscript=True, n_check=64)  # every mask pattern
    files = report["files"]
    assert files["onnx"]["max_abs_diff"] <= FLOAT_TOLERANCE and files["onnx"]["agreement"] == 1.0
    assert files["onnx_int8"]["agreement"] >= 0.8  # random weights: near-ties; real data in bench
    assert files["torchscript"]["max_abs_diff"] <= FLOAT_TOLERANCE
    onnx = OnnxModel(Path(files["onnx"]["path"]))
    assert tuple(onnx.metadata()["class_names"]) == CLASS_NAMES
    x = np.zeros((2, 20, 140), np.float32)
    assert np.isfinite(onnx.logits(x, np.zeros((2, 2), np.float32))).all()  # every modality missing


def test_predict_cli_clip_stream_and_onnx(
    tmp_path: Path, bundle_path: Path, capsys: pytest.CaptureFixture
) -> None:
    clips = [tone(tmp_path / f"c{i}.flac", 2.0, f0=120.0 + 60 * i) for i in range(3)]
    assert main(["predict", str(bundle_path), str(clips[0])]) == 0
    out = capsys.readouterr().out
    assert "emotion:" in out and "speech" in out and "face     absent" in out and "latency:" in out
    export_model(load_bundle(bundle_path), tmp_path / "exp")
    assert (
        main(["predict", str(bundle_path), str(clips[0]), "--onnx", str(tmp_path / "exp" / "model.onnx")])
        == 0
    )
    assert "onnxruntime" in capsys.readouterr().out
    argv = ["predict", str(bundle_path), *map(str, clips), "--stream", "--window", "1", "--hop", "0.5"]
    assert main([*argv, "--out", str(tmp_path / "stream")]) == 0
    with open(tmp_path / "stream" / "stream.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 11 and {r["source"] for r in rows} == {c.name for c in clips}
    probs = np.array([[float(r[f"p_{c}"]) for c in CLASS_NAMES] for r in rows])
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)
    assert (tmp_path / "stream" / "stream.png").stat().st_size > 0


def test_predict_cli_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, bundle_path: Path, capsys: pytest.CaptureFixture
) -> None:
    synthetic = ExperimentConfig(model=ModelConfig(hidden=8))
    toy = toy_dataset(np.zeros((4, 20, 9)), np.ones((4, 3)))
    toy_model = build_model_for(synthetic, toy)
    other = save_bundle(tmp_path / "synthetic.pt", toy_model.state_dict(), bundle_meta(synthetic, toy))
    cases = [
        ([str(bundle_path), str(tmp_path / "missing.flac")], "no audio file"),
        ([str(bundle_path), str(tone(tmp_path / "cd.flac", 1.0, rate=44_100))], "44100 Hz"),
        ([str(other), str(tone(tmp_path / "ok.flac", 1.0))], "model/modality mismatch"),
        ([str(tmp_path / "nothing.pt"), str(tmp_path / "ok.flac")], "no model bundle"),
        (
            [str(bundle_path), str(tmp_path / "ok.flac"), "--face", str(tmp_path / "none.csv")],
            "no face-feature",
        ),
    ]
    for argv, message in cases:
        assert main(["predict", *argv]) == 2, message
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and err.startswith("fedmer predict: ")


@pytest.mark.data
def test_predict_real_ravdess_clip(bundle_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = SHARED_DATA / "ravdess"
    if not (root / "audio16k").is_dir():
        pytest.skip(f"real RAVDESS data not found at {root}")
    flac = root / "audio16k" / "Actor_01" / "03-01-05-02-01-01-01.flac"  # angry, strong; has face features
    assert main(["predict", str(bundle_path), str(flac), "--face", str(root / "face_features.csv")]) == 0
    out = capsys.readouterr().out
    assert "the file name says angry" in out
    assert "absent" not in out  # both speech and face present and explained
    assert out.splitlines()[0].split()[1] in CLASS_NAMES
