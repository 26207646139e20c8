"""Edge latency of the default model on one CPU core: PyTorch vs ONNX float vs ONNX int8.

Trains the default network (``model.*`` defaults: TCN encoders, attention fusion, hidden 32)
centrally without DP on RAVDESS (speech + face, 1,440 clips, features standardised) for a
fixed number of steps (``fedmer.posthoc.audit.attacks.train_like_run``, the run's client
recipe), or takes ``--model`` (a bundle or a run folder). It saves the bundle, exports it
(``fedmer.edge.export``) and reports, all on one thread (``torch.set_num_threads(1)``,
onnxruntime ``intra_op_num_threads=1``):

* per-window model latency (batch 1, one ``data.seq_len`` window): median and p95 over
  ``--runs`` calls after a warm-up, for PyTorch eager, TorchScript, ONNX float, ONNX int8;
* the audio front-end's latency on a ``--window`` second window of a real FLAC;
* file sizes (bundle, ONNX float, ONNX int8, TorchScript);
* held-out accuracy and UAR (actors in no training fold) of PyTorch, ONNX float and int8, the
  int8 argmax agreement with float, and the accuracy lost to quantisation.

    .venv/bin/python -m bench.edge_latency [--steps 300] [--runs 2000] [--model BUNDLE_OR_RUN]

Prints the figures and writes ``bench/results/edge_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedmer.config import DataConfig, ExperimentConfig, PrivacyConfig
from fedmer.data.audio_features import SAMPLE_RATE, read_flac
from fedmer.data.ravdess import resolve_root
from fedmer.data.registry import load_split
from fedmer.edge.bundle import ModelBundle, bundle_meta, load_bundle, open_bundle, save_bundle
from fedmer.edge.export import OnnxModel, export_model
from fedmer.edge.recording import audio_frontend
from fedmer.posthoc.audit.attacks import train_like_run
from fedmer.results.reader import load_run
from fedmer.training.metrics import classification_report

OUT = Path(__file__).resolve().parent / "results" / "edge_latency.json"


def timings(fn: Callable[[], object], runs: int, warmup: int = 50) -> dict[str, float]:
    """Median and p95 wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    t = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        fn()
        t[i] = time.perf_counter() - t0
    return {"median_ms": 1e3 * float(np.median(t)), "p95_ms": 1e3 * float(np.percentile(t, 95)), "runs": runs}


def default_bundle(steps: int, folder: Path) -> tuple[ModelBundle, ExperimentConfig]:
    """The default model trained centrally (no DP) on RAVDESS, saved and reloaded as a bundle."""
    cfg = ExperimentConfig(
        data=DataConfig(name="ravdess", standardize="federated"), privacy=PrivacyConfig(mode="off")
    )
    split = load_split(cfg)
    model = train_like_run(cfg, split.train, seed=0, noise=0.0, steps=steps)
    path = save_bundle(folder / "model_bundle.pt", model.state_dict(), bundle_meta(cfg, split.test))
    return load_bundle(path), cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="a bundle or run folder (default: train one)"
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps of the default model")
    parser.add_argument("--runs", type=int, default=2000, help="timed calls per backend")
    parser.add_argument("--window", type=float, default=3.0, help="front-end window, seconds")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="edge_latency_"))
    t0 = time.monotonic()
    if args.model is None:
        bundle, cfg = default_bundle(args.steps, tmp)
    else:
        bundle, cfg = open_bundle(args.model), load_run(args.model).cfg
    train_s = time.monotonic() - t0
    test = load_split(cfg).test
    export = export_model(bundle, tmp, int8=True, torchscript=True)
    files = export["files"]
    x = torch.from_numpy(np.ascontiguousarray(test.x[:1], dtype=np.float32))
    mask = torch.from_numpy(test.mask[:1].astype(np.float32))
    ts = torch.jit.load(files["torchscript"]["path"])
    sessions = {k: OnnxModel(Path(files[k]["path"]), threads=1) for k in ("onnx", "onnx_int8")}
    xn, mn = x.numpy(), mask.numpy()
    with torch.no_grad():
        latency = {
            "torch": timings(lambda: bundle.model(x, mask), args.runs),
            "torchscript": timings(lambda: ts(x, mask), args.runs),
            "onnx_float": timings(lambda: sessions["onnx"].logits(xn, mn), args.runs),
            "onnx_int8": timings(lambda: sessions["onnx_int8"].logits(xn, mn), args.runs),
        }
    flac = sorted((resolve_root(cfg.data.root) / "audio16k" / "Actor_01").glob("*.flac"))[0]
    signal = read_flac(flac)[: round(args.window * SAMPLE_RATE)]
    fe = audio_frontend(bundle.meta)
    latency["audio_frontend"] = timings(lambda: fe(signal), max(50, args.runs // 10), warmup=5)
    xa, ma = test.x.astype(np.float32), test.mask.astype(np.float32)
    with torch.no_grad():
        pred = {"torch": bundle.model(torch.from_numpy(xa), torch.from_numpy(ma)).numpy().argmax(1)}
    for k, s in sessions.items():
        pred[k] = s.logits(xa, ma).argmax(1)
    scores = {k: classification_report(test.y, p, test.num_classes) for k, p in pred.items()}
    accuracy = {k: {"accuracy": v["accuracy"], "uar": v["uar"]} for k, v in scores.items()}
    result = {
        "model": "{encoder}/{fusion} hidden {hidden}".format(**bundle.meta.model),
        "data": f"{cfg.data.name}, modalities {','.join(bundle.meta.modalities)}, held-out n={len(test)}",
        "trained": "given" if args.model else f"centrally, no DP, {args.steps} steps ({train_s:.0f} s)",
        "threads": 1,
        "window": {
            "seq_len": bundle.meta.seq_len,
            "features": bundle.meta.num_features,
            "audio_s": args.window,
        },
        "latency": latency,
        "size_bytes": {"bundle": (tmp / "model_bundle.pt").stat().st_size if args.model is None else None}
        | {k: v["bytes"] for k, v in files.items()},
        "parity": {k: {"max_abs_diff": v["max_abs_diff"]} for k, v in files.items()},
        "heldout": accuracy,
        "int8_agreement": float((pred["onnx_int8"] == pred["onnx"]).mean()),
        "int8_accuracy_lost": accuracy["onnx"]["accuracy"] - accuracy["onnx_int8"]["accuracy"],
        "machine": {"cpu": platform.processor() or platform.machine(), "loadavg_1min": os.getloadavg()[0]},
        "command": "python -m bench.edge_latency "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v),
    }
    for k, v in latency.items():
        print(f"{k:15s} median {v['median_ms']:7.3f} ms  p95 {v['p95_ms']:7.3f} ms  ({v['runs']} runs)")
    for k, v in result["size_bytes"].items():
        print(f"size {k:12s} {v} bytes" if v else f"size {k:12s} -")
    for k, v in accuracy.items():
        print(f"held-out {k:10s} accuracy {v['accuracy']:.4f}  UAR {v['uar']:.4f}")
    agree, lost = result["int8_agreement"], result["int8_accuracy_lost"]
    print(f"int8 agrees with float on {agree:.4f} of held-out clips; accuracy lost {lost:+.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}; the bundle and its exports are in {tmp}")


if __name__ == "__main__":
    main()
