"""Centralised, actor-independent reference for RAVDESS: how far do the loader's features go?

Multinomial L2 logistic regression (torch, L-BFGS) on per-clip vectors built from exactly what
the federated model receives from ``fedmer.data.ravdess``:

* audio: mean and std over the ``data.seq_len`` pooled frames of the speech features
  (log-mel or MFCC, pitch, deltas; see ``fedmer/data/audio_features.py``);
* audio, unpooled: mean and std over the front-end's 10 ms frames before pooling (same
  front-end, read again from the FLAC files), to show what pooling to segments costs;
* face: the 56 per-clip face features (constant over frames, so frame 0).

Evaluated on the 360 audio-visual clips with grouped k-fold over actors (no actor in both
train and test of a fold), repeated over several actor shuffles; features are standardised
with the training fold's statistics (a centralised reference: no federation constraint). The
L2 strength is fixed in advance (``--l2``), and a small sweep is printed too, so the reported
line is not a best-of. Chance UAR is 1/8 = 0.125.

:func:`heldout_reference` fits the same model on one run's own split (its training persons vs
its held-out persons): ``bench.real_data_results``' logistic-regression rows.

    .venv/bin/python -m bench.ravdess_reference [--frontend logmel|mfcc] [--folds 6] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

import numpy as np
import torch

from fedmer.config import DataConfig
from fedmer.data.audio_features import AudioFrontEnd, read_flac
from fedmer.data.base import DatasetSplit, MultimodalDataset
from fedmer.data.ravdess import expected_clip_ids, load_clips, resolve_root
from fedmer.training.metrics import classification_report


def fit_predict(
    xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, l2: float, classes: int, standardise: bool = True
) -> np.ndarray:
    """Standardise on the training rows, fit softmax regression, predict the test rows.

    ``standardise=False`` fits the features as given (a diagnostic: the federated model gets
    no statistics pooled across clients).
    """
    mean, std = (xtr.mean(axis=0), xtr.std(axis=0) + 1e-8) if standardise else (0.0, 1.0)
    a = torch.tensor((xtr - mean) / std, dtype=torch.float64)
    b = torch.tensor((xte - mean) / std, dtype=torch.float64)
    target = torch.tensor(ytr)
    model = torch.nn.Linear(a.shape[1], classes, dtype=torch.float64)
    opt = torch.optim.LBFGS(
        model.parameters(), max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(a), target) + l2 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return model(b).argmax(dim=1).numpy()


def clip_features(data: MultimodalDataset) -> np.ndarray:
    """One vector per clip: mean and std over frames per modality, frame 0 of the face (constant)."""
    cols = []
    for name, (a, b) in zip(data.modalities, data.feature_slices, strict=True):
        x = data.x[:, :, a:b]
        cols += [x[:, 0]] if name == "face" else [x.mean(axis=1), x.std(axis=1)]
    return np.concatenate(cols, axis=1)


def heldout_reference(split: DatasetSplit, l2: float = 1e-2, standardise: bool = True) -> dict:
    """Fit on ``split.train``, score on its held-out persons: the reference on a federated run's own split."""
    k = split.test.num_classes
    xtr, xte = clip_features(split.train), clip_features(split.test)
    report = classification_report(split.test.y, fit_predict(xtr, split.train.y, xte, l2, k, standardise), k)
    report.update(chance_uar=1.0 / k, train_samples=len(split.train), test_samples=len(split.test))
    return report


def unpooled_audio(cfg: DataConfig, with_face: np.ndarray) -> np.ndarray:
    """Per AV clip: mean and std over the unpooled 10 ms front-end frames (clip order as the loader's)."""
    frontend = AudioFrontEnd(cfg.audio_frontend, cfg.seq_len)
    audio = resolve_root(cfg.root) / "audio16k"
    ids = [c for a in range(1, 25) for c in expected_clip_ids(a)]
    rows = []
    for clip in np.asarray(ids)[with_face]:
        frames = frontend.frames(read_flac(audio / f"Actor_{clip[-2:]}" / f"{clip}.flac"))
        rows.append(np.concatenate([frames.mean(axis=0), frames.std(axis=0)]))
    return np.array(rows)


def grouped_cv_uar(
    x: np.ndarray, y: np.ndarray, actor: np.ndarray, l2: float, folds: int, repeats: int
) -> list[float]:
    """UAR of out-of-fold predictions, one per actor shuffle."""
    scores = []
    for rep in range(repeats):
        actors = np.random.default_rng(rep).permutation(np.unique(actor))
        pred = np.empty_like(y)
        for held in np.array_split(actors, folds):
            test = np.isin(actor, held)
            pred[test] = fit_predict(x[~test], y[~test], x[test], l2, 8)
        scores.append(classification_report(y, pred, 8)["uar"])
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frontend", default="logmel", choices=("logmel", "mfcc"))
    parser.add_argument("--folds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--l2", type=float, default=1e-2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    start = time.perf_counter()
    cfg = DataConfig(name="ravdess", audio_frontend=args.frontend, complete_only=True)
    clips = load_clips(cfg)
    everything = load_clips(dataclasses.replace(cfg, complete_only=False))
    with_face = everything.mask.all(axis=1)
    (sa, sb), (fa, fb) = clips.feature_slices
    speech = clips.x[:, :, sa:sb]
    audio = np.concatenate([speech.mean(axis=1), speech.std(axis=1)], axis=1)
    face = clips.x[:, 0, fa:fb]
    sets = {
        "audio": audio,
        "audio (10 ms frames)": unpooled_audio(cfg, with_face),
        "face": face,
        "audio+face": np.concatenate([audio, face], axis=1),
    }
    print(
        f"{len(clips)} AV clips, {len(np.unique(clips.person))} actors; {args.frontend} front-end: "
        f"audio {audio.shape[1]} dims, face {face.shape[1]}; {args.folds}-fold grouped over actors "
        f"x {args.repeats} shuffles, l2={args.l2}"
    )
    for name, x in sets.items():
        s = grouped_cv_uar(x, clips.y, clips.person, args.l2, args.folds, args.repeats)
        print(f"  {name:<20} UAR {np.mean(s):.3f} +- {np.std(s):.3f}  ({' '.join(f'{v:.3f}' for v in s)})")
    print("L2 sweep (mean UAR over shuffles): l2 -> " + " / ".join(sets))
    for l2 in (1e-3, 3e-3, 3e-2, 1e-1):
        row = [
            np.mean(grouped_cv_uar(x, clips.y, clips.person, l2, args.folds, args.repeats))
            for x in sets.values()
        ]
        print(f"  {l2:<6g} " + " / ".join(f"{v:.3f}" for v in row))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
