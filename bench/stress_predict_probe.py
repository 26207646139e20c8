"""Is there a learnable stress signal in the Stress-Predict windows? A centralised linear probe.

Class-balanced L2 logistic regression (Newton / IRLS in numpy) on each window's 8 per-frame
physio features averaged over its frames, evaluated subject-independently: 5-fold
cross-validation over subjects, and the loader's own held-out split (10 sites, seed 0).
Chance UAR is 0.5. If this probe is near chance the federated models cannot do better
than noise, so it is the first thing to check when stress_predict results look wrong.

    .venv/bin/python bench/stress_predict_probe.py

Measured output (2 CPU cores, 3 s with the feature cache warm):

    30 subjects, 2272 windows, 41.5% stress
    5-fold subject CV, physio means           UAR 0.676 +- 0.037  (folds 0.654 0.649 0.664 0.666 0.749)
    5-fold subject CV, session position only  UAR 0.758 +- 0.013  (folds 0.749 0.770 0.770 0.738 0.763)
    loader split (10 sites, seed 0): 20 train / 10 test subjects, test UAR 0.683
    largest |weight|: hr_mean 0.40, eda_mean 0.40, temp_mean 0.37, eda_std 0.35

So the physiology carries a real, subject-independent stress signal (0.68 vs chance 0.5),
but beware the second line: every session runs the tasks in the same order, so where a
window sits in the session (which the model never sees directly, but slow drifts of skin
temperature and tonic EDA partly encode) predicts the label better than the physio means.
A model scoring well above ~0.75 here may be reading the protocol clock, not stress.
"""

from __future__ import annotations

import logging

import numpy as np

from fedmer.config import DataConfig
from fedmer.data.e4 import PHYSIO_FEATURES
from fedmer.data.stress_predict import default_cache_dir, load_stress_predict, load_subjects, resolve_root
from fedmer.training.metrics import classification_report

CFG = DataConfig(name="stress_predict")


def fit_logreg(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 25) -> np.ndarray:
    """Weights (bias last) of a class-balanced, L2-regularised logistic regression."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    sample_w = np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    w = np.zeros(xb.shape[1])
    reg = l2 * np.eye(len(w))
    reg[-1, -1] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-xb @ w))
        grad = xb.T @ (sample_w * (p - y)) / len(y) + reg @ w
        hess = (xb * (sample_w * p * (1 - p))[:, None]).T @ xb / len(y) + reg
        w -= np.linalg.solve(hess, grad)
    return w


def uar(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    pred = (np.hstack([x, np.ones((len(x), 1))]) @ w > 0).astype(np.int64)
    return classification_report(y, pred, 2)["uar"]


def train_test_uar(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray) -> tuple:
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0) + 1e-6  # training subjects' statistics only
    w = fit_logreg((x_tr - mean) / std, y_tr)
    return uar(w, (x_te - mean) / std, y_te), w


def main() -> None:
    subjects, _ = load_subjects(resolve_root(CFG.root), CFG.seq_len, default_cache_dir())
    x = np.concatenate([s.x.mean(axis=1) for s in subjects]).astype(np.float64)
    y = np.concatenate([s.y for s in subjects])
    person = np.concatenate([np.full(len(s.y), s.person) for s in subjects])
    print(f"{len(subjects)} subjects, {len(y)} windows, {100 * y.mean():.1f}% stress")

    folds = np.array_split(np.random.default_rng(0).permutation(np.unique(person)), 5)
    # Confound check: the task order is fixed, so position in the session predicts the label.
    pos = np.concatenate([(s.start - s.start.min()) / np.ptp(s.start) for s in subjects])
    for name, feats in (("physio means", x), ("session position only", np.stack([pos, pos**2], 1))):
        scores = []
        for held in folds:
            test = np.isin(person, held)
            scores.append(train_test_uar(feats[~test], y[~test], feats[test], y[test])[0])
        print(
            f"5-fold subject CV, {name:22s} UAR {np.mean(scores):.3f} +- {np.std(scores):.3f}  "
            f"(folds {' '.join(f'{s:.3f}' for s in scores)})"
        )

    split = load_stress_predict(CFG, 10, 0)
    a, b = split.train.feature_slices[2]
    x_tr, x_te = split.train.x[:, :, a:b].mean(axis=1), split.test.x[:, :, a:b].mean(axis=1)
    score, w = train_test_uar(x_tr, split.train.y, x_te, split.test.y)
    n_tr, n_te = len(np.unique(split.train.person)), len(np.unique(split.test.person))
    print(f"loader split (10 sites, seed 0): {n_tr} train / {n_te} test subjects, test UAR {score:.3f}")
    top = np.argsort(-np.abs(w[:-1]))[:4]
    print("largest |weight|: " + ", ".join(f"{PHYSIO_FEATURES[i]} {w[i]:.2f}" for i in top))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main()
