"""``fedmer predict``: classify a recording with a bundle, explain it, time it; or a stream.

One clip: the bundle's audio front-end (and face features when given) -> the model -> the
emotion, its probabilities, each modality's contribution (``fedmer.posthoc.explain``: the
fusion's weights and the ablation drop) and the latency of each stage.

Streaming (a driver-monitoring cabin): a window of ``window_s`` seconds slides by ``hop_s``
over a longer signal (e.g. several clips one after another); every window is classified on
its own, with its latency, and the per-window probabilities go to a CSV and a timeline PNG.

The model runs either in PyTorch (the bundle) or in onnxruntime (an exported ``.onnx``,
float or int8); latencies are wall-clock medians on however many threads the caller set.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedmer.data.audio_features import SAMPLE_RATE
from fedmer.data.base import MultimodalDataset
from fedmer.edge.bundle import ModelBundle
from fedmer.edge.recording import Recording, audio_frontend, pack
from fedmer.posthoc.explain import ModalityContribution, explain

__all__ = [
    "ClipPrediction",
    "LogitsFn",
    "WindowPrediction",
    "format_clip",
    "format_window",
    "plot_timeline",
    "predict_clip",
    "predict_stream",
    "torch_logits",
    "write_stream_csv",
]

log = logging.getLogger(__name__)

#: ``(x (B,T,F), mask (B,M)) -> logits (B,C)``, numpy in and out: a PyTorch model or an ONNX session.
LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def torch_logits(bundle: ModelBundle) -> LogitsFn:
    """The bundle's PyTorch model as a :data:`LogitsFn` (no autograd)."""
    model = bundle.model.eval()

    def run(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x), torch.from_numpy(mask)).numpy()

    return run


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


@dataclass(frozen=True)
class ClipPrediction:
    """One recording's emotion, probabilities, modality contributions and stage latencies."""

    emotion: str
    probabilities: dict[str, float]
    contributions: tuple[ModalityContribution, ...]
    true: str | None
    features_ms: float
    model_ms: float


def predict_clip(
    bundle: ModelBundle,
    recording: Recording,
    face: np.ndarray | None = None,
    logits_fn: LogitsFn | None = None,
    repeats: int = 20,
) -> ClipPrediction:
    """Classify the whole recording; latencies are medians over ``repeats`` runs (after a warm-up)."""
    meta = bundle.meta
    fe = audio_frontend(meta)
    run = logits_fn or torch_logits(bundle)
    speech = fe(recording.signal)
    features_ms = _median_ms(lambda: fe(recording.signal), max(1, repeats // 4))
    x, mask = pack(meta, speech, face)
    logits = run(x, mask)[0]
    model_ms = _median_ms(lambda: run(x, mask), repeats)
    true = recording.segments[0].label if len(recording.segments) == 1 else None
    sample = MultimodalDataset(
        x=x,
        mask=mask.astype(bool),
        y=np.array([meta.class_names.index(true) if true in meta.class_names else 0]),
        person=np.zeros(1, np.int64),
        site=np.zeros(1, np.int64),
        modalities=meta.modalities,
        feature_slices=meta.feature_slices,
        class_names=meta.class_names,
    )
    contributions = explain(bundle.model, sample, [0])[0].contributions  # always the PyTorch model
    probs = _softmax(logits)
    return ClipPrediction(
        emotion=meta.class_names[int(np.argmax(logits))],
        probabilities={c: float(p) for c, p in zip(meta.class_names, probs, strict=True)},
        contributions=contributions,
        true=true if true in meta.class_names else None,
        features_ms=features_ms,
        model_ms=model_ms,
    )


@dataclass(frozen=True)
class WindowPrediction:
    """One window of a stream: where it lies, what it says, what it cost."""

    index: int
    start_s: float
    end_s: float
    emotion: str
    probabilities: tuple[float, ...]
    source: str  # the clip covering the window's centre
    true: str | None
    features_ms: float
    model_ms: float


def predict_stream(
    bundle: ModelBundle,
    recording: Recording,
    window_s: float = 3.0,
    hop_s: float = 1.0,
    face: np.ndarray | None = None,
    logits_fn: LogitsFn | None = None,
) -> list[WindowPrediction]:
    """Slide a ``window_s`` window by ``hop_s`` over the recording; classify each window alone."""
    if not (window_s > 0 and hop_s > 0):
        raise ValueError(f"invalid window_s={window_s}, hop_s={hop_s}: both must be positive")
    meta = bundle.meta
    fe = audio_frontend(meta)
    run = logits_fn or torch_logits(bundle)
    n, win, hop = len(recording.signal), round(window_s * SAMPLE_RATE), round(hop_s * SAMPLE_RATE)
    starts = list(range(0, max(1, n - win + 1), hop))
    run(*pack(meta, fe(recording.signal[:win]), face))  # warm-up: first-call allocations are not latency
    out = []
    for i, s in enumerate(starts):
        t0 = time.perf_counter()
        x, mask = pack(meta, fe(recording.signal[s : s + win]), face)
        t1 = time.perf_counter()
        logits = run(x, mask)[0]
        t2 = time.perf_counter()
        start, end = s / SAMPLE_RATE, min(s + win, n) / SAMPLE_RATE
        mid = (start + end) / 2
        seg = next((g for g in recording.segments if g.start_s <= mid < g.end_s), recording.segments[-1])
        out.append(
            WindowPrediction(
                index=i,
                start_s=start,
                end_s=end,
                emotion=meta.class_names[int(np.argmax(logits))],
                probabilities=tuple(float(p) for p in _softmax(logits)),
                source=seg.name,
                true=seg.label,
                features_ms=1e3 * (t1 - t0),
                model_ms=1e3 * (t2 - t1),
            )
        )
    log.info("classified %d windows of %.1f s (hop %.1f s)", len(out), window_s, hop_s)
    return out


def write_stream_csv(windows: Sequence[WindowPrediction], class_names: Sequence[str], path: Path) -> Path:
    """One row per window: span, emotion, one probability column per class, source, latencies."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        probs = [f"p_{c}" for c in class_names]
        w.writerow(
            ["window", "start_s", "end_s", "emotion", *probs, "source", "true", "features_ms", "model_ms"]
        )
        for r in windows:
            w.writerow(
                [r.index, f"{r.start_s:.3f}", f"{r.end_s:.3f}", r.emotion]
                + [f"{p:.5f}" for p in r.probabilities]
                + [r.source, r.true or "", f"{r.features_ms:.3f}", f"{r.model_ms:.3f}"]
            )
    return path


def plot_timeline(
    windows: Sequence[WindowPrediction], recording: Recording, class_names: Sequence[str], path: Path
) -> Path:
    """Probability of each emotion over time (window centres), source clips and their labels shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedmer.results.figures import save_figure

    t = np.array([(w.start_s + w.end_s) / 2 for w in windows])
    p = np.array([w.probabilities for w in windows])
    fig, (ax, strip) = plt.subplots(2, 1, figsize=(10, 5), sharex=True, height_ratios=[4, 1])
    colours = plt.get_cmap("tab10")
    for k, c in enumerate(class_names):
        ax.plot(t, p[:, k], marker="o", ms=3, color=colours(k), label=c)
    for i, seg in enumerate(recording.segments):
        ax.axvspan(seg.start_s, seg.end_s, color="grey", alpha=0.08 if i % 2 else 0.0)
        ax.text((seg.start_s + seg.end_s) / 2, 1.02, seg.label or seg.name, ha="center", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("probability")
    ax.legend(ncol=4, fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.02, 1, 0), frameon=False)
    idx = [class_names.index(w.emotion) for w in windows]
    strip.scatter(t, idx, c=[colours(k) for k in idx], s=25)
    strip.set_yticks(range(len(class_names)), class_names, fontsize=7)
    strip.set_xlabel("time (s), window centre")
    strip.set_ylabel("emotion")
    ax.set_title("emotion over time (labels above: the clip's own emotion)")
    return save_figure(fig, path)


def format_clip(p: ClipPrediction, backend: str) -> str:
    """The human-readable answer of ``fedmer predict`` for one clip."""
    top = sorted(p.probabilities.items(), key=lambda kv: -kv[1])[:3]
    lines = [
        f"emotion: {p.emotion} (p={p.probabilities[p.emotion]:.3f})"
        + (f"; the file name says {p.true}" if p.true else ""),
        "top 3: " + ", ".join(f"{c} {v:.3f}" for c, v in top),
        "modality contributions (fusion weight; drop in p(predicted) when masked out):",
    ]
    for c in p.contributions:
        if not c.present:
            lines.append(f"  {c.modality:8s} absent")
            continue
        weight = "n/a" if c.weight is None else f"{c.weight:.3f}"
        lines.append(f"  {c.modality:8s} weight {weight:>6s}  prob drop {c.prob_drop:+.3f}")
    lines.append(
        f"latency: front-end {p.features_ms:.2f} ms + model {p.model_ms:.3f} ms ({backend}) "
        f"= {p.features_ms + p.model_ms:.2f} ms"
    )
    return "\n".join(lines)


def format_window(w: WindowPrediction) -> str:
    """One streaming line: span, emotion, its probability, latency."""
    p = max(w.probabilities)
    return (
        f"[{w.start_s:6.2f}-{w.end_s:6.2f} s] {w.emotion:9s} p={p:.2f}  "
        f"{w.features_ms + w.model_ms:6.2f} ms (model {w.model_ms:.3f})  {w.source}"
    )
