"""Why does FedMER's face-only DP recipe score 0.451 where issue 9's quick check scored ~0.58?

A numpy reimplementation of federated full-batch DP-GD for a softmax regression (the quick
check of issue 9: 6 sites of 3 training actors, per-sample clip 1, 15 rounds of one step,
epsilon 8 at delta 1e-5), on the split FedMER itself uses (``load_split`` of
``+experiment=ravdess_av_dp`` at each seed), moved one knob at a time towards FedMER's
pipeline (features, scale, server optimiser, lr, rounds). Each variant is a named dict of
settings; ``--variants`` picks some, ``--seeds`` the splits.

Every site adds Gaussian noise ``sigma * C`` to the sum of its clipped per-sample gradients
(full batch: sample rate 1, one step a round, so ``rounds`` steps in all), divides by its size
and steps by ``lr``; the server averages the sites' updates weighted by size (FedAvg: adds
them at ``server_lr``; FedAdam: Flower's update with its bias correction). The noise comes
from FedMER's own accountant search (``noise_for_target``), so it is what a run would use.

Scores are on the held-out actors (diagnostic: this script is for understanding the gap,
not for choosing settings; the choices FedMER makes are validated across *training* sites
with ``--cv``: each training site in turn is the validation site, the other five train).

FedMER's own models and recipe (variants ``v2``, ``v1`` and their combinations; ``Setting.encoder``
``means``/``functionals``): :func:`design` builds the linear model's inputs with one intercept per
modality, zero where a modality is absent (the sum fusion adds nothing for it), and
:func:`train_fedmer` runs each site's auto recipe (``choose_recipe``: Poisson rate, steps a round,
noise and lr, SGD momentum 0.9 fresh each round) and FedAvg or Flower's FedAdam on the server.
It reproduces FedMER's held-out scores within the noise draws (1,440 clips, 3 seeds: v2 0.342
against FedMER's 0.326, v1 0.356 against 0.357). ``--set clips=1440`` uses every clip (the face
on 1/4, masked elsewhere), ``--set features=speech prior=false`` the speech alone,
``--set frontend=mfcc|egemaps`` another speech front-end, ``--set face_subset=means`` the 28 face
means (``data.face_features=means``).

Standardisation (``--set transform=...``, FedMER-faithful variants): ``standardise`` uses the exact
pooled statistics of the fitting sites (not private: an upper bound); ``release`` FedMER's own DP
release (``data.standardize=federated``: ``local_release`` per fitting site, ``combine_releases``,
the release's noise from ``stats_fraction`` of epsilon and DP-SGD's noise with it as a prior);
``calib`` the exact statistics of one other training site, which then does not train (what
``data.standardize=calibration`` does with the calibration site; held out: the last site).
``face_logodds=true`` puts the face on the log-odds scale before any of them.

    nice -n 10 .venv/bin/python -m bench.dp_gap [--seeds 0 1 2] [--variants a b] [--cv] [--set k=v ...]
    nice -n 10 .venv/bin/python -m bench.dp_gap --cv --variants v1 v2 --set clips=1440
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

import numpy as np

from fedmer.data.base import MultimodalDataset
from fedmer.data.feature_stats import FeatureStats, combine_releases, local_release
from fedmer.data.registry import load_split
from fedmer.privacy.engine import gaussian_release_noise, noise_for_target
from fedmer.training.metrics import classification_report
from simulations.compose import compose_experiment

K = 8


@dataclasses.dataclass(frozen=True)
class Setting:
    features: str = "face56"  # face56 | face112 (+ const std functionals) | speech+face | speech
    transform: str = "none"  # none | logodds | standardise (pooled train stats: not private)
    eps: float = 8.0
    rounds: int = 15
    clip: float = 1.0
    lr: float = 1.0  # client step
    server: str = "fedavg"  # fedavg | fedadam
    server_lr: float = 1.0
    tau: float = 1e-3
    init: str = "zero"  # zero | torch (uniform +-1/sqrt(d), as nn.Linear)
    accountant: str = "rdp"
    sites: int = 6
    speech_stats: str = "meanstd"  # meanstd | mean
    face_subset: str = "all"  # all (56) | means (28) | probs (the 7 expression probabilities)
    prior: bool = False  # start from the face recogniser's own emotion probabilities (zero-shot)
    # --- FedMER-faithful settings (encoder != "legacy"), used for the 1,440-clip choices ---
    encoder: str = "legacy"  # legacy (as above) | means (means_linear) | functionals (functionals_linear)
    clips: str = "360"  # 360 (data.complete_only=true) | 1440 (every clip; face on 1/4, masked)
    frontend: str = "logmel"  # data.audio_frontend
    # data.audio_level_norm; "legacy": as every figure here before it was a key (eGeMAPS on, numpy off)
    level_norm: str = "legacy"
    recipe: str = "fixed"  # fixed: one full-batch step of lr a round | auto: FedMER's choose_recipe
    base_lr: float = 0.1  # federation.lr, the auto recipe's starting point
    # transform=release: FedMER's own DP statistics release (data.standardize=federated)
    stats_fraction: float = 0.1  # privacy.stats_epsilon_fraction
    stats_clip: float = 20.0  # privacy.stats_clip_norm
    face_logodds: bool = False  # the face on the log-odds scale before any other transform
    prior_release: float = 0.0  # set internally: the release's noise multiplier, spent before DP-SGD


#: RAVDESS class -> the face recogniser's expression probability of the same name (calm: neutral).
#: Face order: anger, disgust, fear, happiness, sadness, surprise, neutral.
PRIOR = {0: 6, 1: 6, 2: 3, 3: 4, 4: 0, 5: 2, 6: 1, 7: 5}
FACE_SUBSETS = {"all": slice(0, 56), "means": slice(0, 28), "probs": slice(0, 7)}


def features(data: MultimodalDataset, s: Setting) -> np.ndarray:
    """Per-clip vectors as FedMER's linear model sees them (functionals of the frames)."""
    cols = []
    for name, (a, b) in zip(data.modalities, data.feature_slices, strict=True):
        x = data.x[:, :, a:b]
        if name == "face" and "face" in s.features:
            cols.append(x[:, 0, FACE_SUBSETS[s.face_subset]])
            if s.features.endswith("112") or s.features.startswith("speech+face"):
                cols.append(np.sqrt(x.var(axis=1) + 1e-6))  # the constant std functionals
        if name == "speech" and "speech" in s.features:
            cols.append(x.mean(axis=1))
            if s.speech_stats == "meanstd":
                cols.append(np.sqrt(x.var(axis=1) + 1e-6))
    return np.concatenate(cols, axis=1).astype(np.float64)


def logodds(x: np.ndarray) -> np.ndarray:
    q = np.clip(x, 0.0, 1.0)
    return np.log((q + 0.01) / (1.01 - q))


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def train(
    sites: list[tuple[np.ndarray, np.ndarray]], s: Setting, rng: np.random.Generator, face: slice
) -> np.ndarray:
    d = sites[0][0].shape[1] + 1
    w = rng.uniform(-1, 1, (d, K)) / np.sqrt(d - 1) if s.init == "torch" else np.zeros((d, K))
    if s.prior:
        w[:] = 0.0
        for k, j in PRIOR.items():
            w[face.start + j, k] = 1.0
    n_total = sum(len(y) for _, y in sites)
    sigma = (
        0.0
        if s.eps == float("inf") or s.rounds == 0
        else noise_for_target(s.eps, 1e-5, 1.0, s.rounds, s.accountant)
    )
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t in range(1, s.rounds + 1):
        delta = np.zeros_like(w)
        for x, y in sites:
            xb = np.hstack([x, np.ones((len(x), 1))])
            p = softmax(xb @ w)
            p[np.arange(len(y)), y] -= 1.0
            g = xb[:, :, None] * p[:, None, :]  # (n, d, K) per-sample gradients
            norms = np.sqrt((g**2).sum(axis=(1, 2)))
            g *= np.minimum(1.0, s.clip / (norms + 1e-12))[:, None, None]
            noisy = (g.sum(axis=0) + rng.normal(0.0, sigma * s.clip, w.shape)) / len(y)
            delta += (len(y) / n_total) * (-s.lr * noisy)
        if s.server == "fedavg":
            w = w + s.server_lr * delta
        else:
            m = 0.9 * m + 0.1 * delta
            v = 0.99 * v + 0.01 * delta**2
            eta = s.server_lr * np.sqrt(1 - 0.99 ** (t + 1)) / (1 - 0.9 ** (t + 1))
            w = w + eta * m / (np.sqrt(v) + s.tau)
    return w


def prepare(train_x: np.ndarray, test_x: np.ndarray, s: Setting, face_cols: slice) -> tuple[np.ndarray, ...]:
    if s.transform == "logodds":
        train_x, test_x = train_x.copy(), test_x.copy()
        train_x[:, face_cols] = logodds(train_x[:, face_cols])
        test_x[:, face_cols] = logodds(test_x[:, face_cols])
    elif s.transform in ("standardise", "centre", "scale"):
        mu, sd = train_x.mean(axis=0), train_x.std(axis=0) + 1e-8
        mu = mu if s.transform != "scale" else 0.0
        sd = sd if s.transform != "centre" else 1.0
        train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
    elif s.transform == "half":  # public: centre [0, 1] numbers at 0.5
        train_x, test_x = train_x.copy(), test_x.copy()
        train_x[:, face_cols] -= 0.5
        test_x[:, face_cols] -= 0.5
    return train_x, test_x


_SPLITS: dict[tuple[object, ...], Any] = {}


def split_for(seed: int, s: Setting) -> Any:
    mods = "face" if s.features.startswith("face") else "'" + s.features.replace("+", ",") + "'"
    loader = s.transform == "release"  # the face as FedMER's loader hands it to the release
    level = (s.frontend == "egemaps") if s.level_norm == "legacy" else s.level_norm == "true"
    key = (seed, mods, s.clips, s.frontend, loader and s.face_subset, level)
    if key not in _SPLITS:
        cfg = compose_experiment(
            [
                "+experiment=ravdess_av_dp",
                f"data.modalities={mods}",
                f"seed={seed}",
                f"data.face_transform={'logodds' if loader else 'none'}",
                f"data.face_features={'means' if loader and s.face_subset == 'means' else 'all'}",
                f"data.complete_only={'true' if s.clips == '360' else 'false'}",
                f"data.audio_frontend={s.frontend}",
                f"data.audio_level_norm={'true' if level else 'false'}",
            ]
        )
        _SPLITS[key] = load_split(cfg)
    return _SPLITS[key]


def face_slice(s: Setting, data: MultimodalDataset) -> slice:
    width_face = FACE_SUBSETS[s.face_subset].stop
    if s.features.startswith("face"):
        return slice(0, width_face)
    if "face" not in s.features:
        return slice(0, 0)
    w = dict(zip(data.modalities, data.feature_slices, strict=True))
    a, b = w["speech"]
    width = (b - a) * (2 if s.speech_stats == "meanstd" else 1)
    return slice(width, width + width_face)  # speech functionals come first, then the face numbers


def design(data: MultimodalDataset, s: Setting) -> tuple[np.ndarray, slice]:
    """FedMER's linear model's inputs: per modality its encoder's features and its own intercept,
    all zero where the modality is absent (the sum fusion adds nothing for it); face log-odds
    (``data.face_transform``) applied when ``s.transform == "logodds"``. Returns the design
    matrix and the columns of the face features the prior indexes."""
    cols, face = [], slice(0, 0)
    width = 0
    for m, (name, (a, b)) in enumerate(zip(data.modalities, data.feature_slices, strict=True)):
        x = data.x[:, :, a:b].astype(np.float64)
        if name == "face":
            x = x[:, :, FACE_SUBSETS[s.face_subset]]
            if s.transform == "logodds" or s.face_logodds:
                x = logodds(x)
            face = slice(width, width + x.shape[2])
        block = [x.mean(axis=1)]
        if s.encoder == "functionals":
            block.append(np.sqrt(x.var(axis=1) + 1e-6))
        block.append(np.ones((len(x), 1)))
        z = np.concatenate(block, axis=1) * data.mask[:, m, None]
        cols.append(z)
        width += z.shape[1]
    return np.concatenate(cols, axis=1), face


def train_fedmer(
    sites: list[tuple[np.ndarray, np.ndarray]], s: Setting, rng: np.random.Generator, face: slice
) -> np.ndarray:
    """FedMER's local DP-SGD (Poisson rate q, SGD momentum 0.9 fresh each round, noise sigma*C on
    the sum of clipped per-sample gradients over the expected batch) with each site's auto
    recipe (``choose_recipe``: steps, rate, sigma, lr) or the fixed one-step rule; FedAvg or
    Flower's FedAdam on the server. The design matrix carries its own intercepts."""
    from fedmer.privacy.recipe import choose_recipe

    d = sites[0][0].shape[1]
    w = np.zeros((d, K))
    if s.prior and face.stop > face.start:  # the prior needs the face (FedMER refuses it without)
        for k, j in PRIOR.items():
            w[face.start + j, k] = 1.0
    plans = []
    for x, _ in sites:
        if s.recipe == "auto" and s.eps != float("inf"):
            r = choose_recipe(
                len(x),
                num_rounds=s.rounds,
                target_epsilon=s.eps,
                delta=1e-5,
                accountant=s.accountant,
                max_grad_norm=s.clip,
                lr=s.base_lr,
                batch_size=128,
                prior=((s.prior_release, 1.0, 1),) if s.prior_release else (),
            )
            plans.append((r.sample_rate, r.steps_per_round, r.noise_multiplier, r.lr))
        else:
            sigma = (
                0.0 if s.eps == float("inf") else noise_for_target(s.eps, 1e-5, 1.0, s.rounds, s.accountant)
            )
            plans.append((1.0, 1, sigma, s.lr))
    n_total = sum(len(y) for _, y in sites)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t in range(1, s.rounds + 1):
        delta = np.zeros_like(w)
        for (x, y), (q, k_steps, sigma, lr) in zip(sites, plans, strict=True):
            wl, buf = w.copy(), None
            for _ in range(k_steps):
                take = np.ones(len(y), bool) if q >= 1 else rng.random(len(y)) < q
                xb, yb = x[take], y[take]
                p = softmax(xb @ wl)
                p[np.arange(len(yb)), yb] -= 1.0
                g = xb[:, :, None] * p[:, None, :]
                norms = np.sqrt((g**2).sum(axis=(1, 2)))
                g *= np.minimum(1.0, s.clip / (norms + 1e-12))[:, None, None]
                grad = (g.sum(axis=0) + rng.normal(0.0, sigma * s.clip, w.shape)) / (q * len(y))
                buf = grad if buf is None else 0.9 * buf + grad
                wl -= lr * buf
            delta += (len(y) / n_total) * (wl - w)
        if s.server == "fedavg":
            w = w + s.server_lr * delta
        else:
            m = 0.9 * m + 0.1 * delta
            v = 0.99 * v + 0.01 * delta**2
            eta = s.server_lr * np.sqrt(1 - 0.99 ** (t + 1)) / (1 - 0.9 ** (t + 1))
            w = w + eta * m / (np.sqrt(v) + s.tau)
    return w


def _released_stats(
    sites: list[MultimodalDataset], s: Setting, rng: np.random.Generator
) -> tuple[FeatureStats, float]:
    """FedMER's ``data.standardize=federated`` release: each site's clipped, noised sums
    (``local_release``) combined by the server (``combine_releases``), at the noise FedMER
    derives from ``stats_fraction`` of epsilon (``gaussian_release_noise``)."""
    sigma = (
        0.0 if s.eps == float("inf") else gaussian_release_noise(s.stats_fraction * s.eps, 1e-5, s.accountant)
    )
    clip = s.stats_clip if sigma > 0 else float("inf")
    releases = {
        i: local_release(d, clip_norm=clip, noise_multiplier=sigma, rng=rng if sigma > 0 else None)
        for i, d in enumerate(sites)
    }
    return combine_releases(releases, sites[0].feature_slices), sigma


def _standardised_design(data: MultimodalDataset, stats: FeatureStats, s: Setting) -> np.ndarray:
    """:func:`design` as FedMER's model computes it with ``set_feature_stats(stats)``: frames
    standardised by the frame statistics, then each encoder's per-clip mean and std by the
    functional statistics in those units (``MultimodalEmotionNet.set_feature_stats``)."""
    mean, std = np.asarray(stats.mean), np.asarray(stats.std)
    z = (data.x.astype(np.float64) - mean) / std
    for m, (a, b) in enumerate(data.feature_slices):
        z[~data.mask[:, m], :, a:b] = 0.0
    x, _ = design(dataclasses.replace(data, x=z), s)
    cols, at = [], 0
    for m, (a, b) in enumerate(data.feature_slices):
        f = b - a  # the loader already kept FedMER's face subset
        sd = std[a:b]
        mean_sd, std_mean, std_sd = (
            np.asarray(getattr(stats, k))[a:b] for k in ("mean_sd", "std_mean", "std_sd")
        )
        block = [x[:, at : at + f] * (sd / mean_sd)]
        width = f
        if s.encoder == "functionals":
            block.append((x[:, at + f : at + 2 * f] - std_mean / sd) * (sd / std_sd))
            width += f
        block.append(x[:, at + width : at + width + 1])  # the intercept
        cols.append(np.concatenate(block, axis=1) * data.mask[:, m, None])
        at += width + 1
    return np.concatenate(cols, axis=1)


def _standardise(x: np.ndarray, rows: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns that vary scaled to mean 0, sd 1 over the clips of ``x[rows]`` that have them.

    A modality a clip lacks is all zero in :func:`design` (the sum fusion adds nothing for it);
    it stays zero, and the statistics come from the clips that have it. Intercepts (constant 1
    where present) are kept.
    """
    present = x[rows] != 0
    count = np.maximum(present.sum(axis=0), 1)
    mu = x[rows].sum(axis=0) / count
    sd = np.sqrt((np.where(present, x[rows] - mu, 0.0) ** 2).sum(axis=0) / count)
    vary = sd > 1e-9
    mu, sd = np.where(vary, mu, 0.0), np.where(vary, sd, 1.0)
    return tuple(np.where(z != 0, (z - mu) / sd, 0.0) for z in (x, other))  # type: ignore[return-value]


def score_fedmer(seed: int, s: Setting, cv: bool, repeats: int) -> float:
    split = split_for(seed, s)
    tr, te = split.train, split.test
    xtr, fs = design(tr, s)
    xte, _ = design(te, s)
    site_ids = np.unique(tr.site)
    results = []
    for rep in range(repeats):
        rng = np.random.default_rng(1000 * seed + rep)
        folds = site_ids if cv else [None]
        for val in folds:  # leave one training site out: validation on training actors only
            keep = tr.site != val
            xfit, xv, yv = xtr, *((xtr[~keep], tr.y[~keep]) if cv else (xte, te.y))
            s_fit = s
            if s.transform == "standardise":  # exact pooled statistics of the training sites: an upper
                xfit, xv = _standardise(xtr, keep, xv)  # bound for what a DP release could give
            elif s.transform == "calib":  # exact statistics of one other site, which then does not train
                cal = (
                    site_ids[-1]
                    if val is None
                    else site_ids[(np.searchsorted(site_ids, val) + 1) % len(site_ids)]
                )
                xfit, xv = _standardise(xtr, tr.site == cal, xv)
                keep = keep & (tr.site != cal)
            elif s.transform == "release":  # FedMER's DP release from the fitting sites only
                fit_sites = [tr.subset(np.flatnonzero(tr.site == k)) for k in site_ids if k != val]
                stats, sigma_stats = _released_stats(fit_sites, s, rng)
                xfit = _standardised_design(tr, stats, s)
                xv = _standardised_design(tr.subset(np.flatnonzero(~keep)) if cv else te, stats, s)
                s_fit = dataclasses.replace(s, prior_release=sigma_stats)
            sites = [
                (xfit[tr.site == k], tr.y[tr.site == k])
                for k in site_ids
                if k != val and keep[tr.site == k].all()  # not the validation or calibration site
            ]
            w = train_fedmer(sites, s_fit, rng, fs)
            results.append(classification_report(yv, (xv @ w).argmax(axis=1), K)["uar"])
    return float(np.mean(results))


def score(seed: int, s: Setting, cv: bool = False, repeats: int = 1) -> float:
    if s.encoder != "legacy":
        return score_fedmer(seed, s, cv, repeats)
    split = split_for(seed, s)
    tr, te = split.train, split.test
    fs = face_slice(s, tr)
    xtr, xte = features(tr, s), features(te, s)
    site_ids = np.unique(tr.site)
    results = []
    for rep in range(repeats):
        rng = np.random.default_rng(1000 * seed + rep)
        if not cv:
            a, b = prepare(xtr, xte, s, fs)
            sites = [(a[tr.site == k], tr.y[tr.site == k]) for k in site_ids]
            w = train(sites, s, rng, fs)
            pred = (np.hstack([b, np.ones((len(b), 1))]) @ w).argmax(axis=1)
            results.append(classification_report(te.y, pred, K)["uar"])
            continue
        for val in site_ids:  # leave one training site out: validation on training actors only
            keep = tr.site != val
            a, b = prepare(xtr[keep], xtr[~keep], s, fs)
            sites = [(a[tr.site[keep] == k], tr.y[keep][tr.site[keep] == k]) for k in site_ids if k != val]
            w = train(sites, s, rng, fs)
            pred = (np.hstack([b, np.ones((len(b), 1))]) @ w).argmax(axis=1)
            results.append(classification_report(tr.y[~keep], pred, K)["uar"])
    return float(np.mean(results))


VARIANTS: dict[str, Setting] = {
    # the quick check as the issue describes it, on raw face numbers and exactly standardised ones
    "quick-raw": Setting(),
    "quick-std": Setting(transform="standardise"),
    "quick-logodds": Setting(transform="logodds"),
    "quick-centre": Setting(transform="centre"),
    "quick-scale": Setting(transform="scale"),
    "quick-half": Setting(transform="half"),
    # towards FedMER: the 56 constant std functionals, torch init, FedAdam
    "quick-logodds-112": Setting(features="face112", transform="logodds"),
    "quick-logodds-112-torchinit": Setting(features="face112", transform="logodds", init="torch"),
    "fedmer-face": Setting(
        features="face112", transform="logodds", init="torch", server="fedadam", server_lr=0.1
    ),
    "fedmer-face-fedadam-zero": Setting(
        features="face112", transform="logodds", server="fedadam", server_lr=0.1
    ),
    # --- FedMER's own models and recipe (design(), train_fedmer()); clips=1440 via --set ---
    # v2 (+experiment=ravdess_av_dp): means, prior, FedAvg, the auto recipe
    "v2": Setting(features="speech+face", transform="logodds", encoder="means", prior=True, recipe="auto"),
    # the first recipe: functionals, no prior, FedAdam (server lr 0.1), the auto recipe
    "v1": Setting(
        features="speech+face",
        transform="logodds",
        encoder="functionals",
        server="fedadam",
        server_lr=0.1,
        recipe="auto",
    ),
    "means-fedadam": Setting(
        features="speech+face",
        transform="logodds",
        encoder="means",
        server="fedadam",
        server_lr=0.1,
        recipe="auto",
    ),
    "means-prior-fedadam": Setting(
        features="speech+face",
        transform="logodds",
        encoder="means",
        prior=True,
        server="fedadam",
        server_lr=0.1,
        recipe="auto",
    ),
    "functionals-fedavg": Setting(
        features="speech+face", transform="logodds", encoder="functionals", recipe="auto"
    ),
    "functionals-prior-fedavg": Setting(
        features="speech+face", transform="logodds", encoder="functionals", prior=True, recipe="auto"
    ),
    "functionals-prior-fedadam": Setting(
        features="speech+face",
        transform="logodds",
        encoder="functionals",
        prior=True,
        server="fedadam",
        server_lr=0.1,
        recipe="auto",
    ),
}


def print_scales(s: Setting, seed: int) -> None:
    """How far apart the inputs' scales are: quantiles of each varying column's std over the
    training clips, and of its |mean| / std (why a joint-clipped DP release cannot resolve them)."""
    tr = split_for(seed, s).train
    x, _ = design(tr, s)
    sd = x.std(axis=0)
    vary = sd > 1e-6
    q = (0, 0.1, 0.5, 0.9, 1)
    print(f"{int(vary.sum())} varying columns of {x.shape[1]}, {len(x)} training clips")
    print("std quantiles 0/10/50/90/100%:", " ".join(f"{v:.3g}" for v in np.quantile(sd[vary], q)))
    ratio = np.abs(x.mean(axis=0))[vary] / sd[vary]
    print("|mean|/std quantiles 0/10/50/90/100%:", " ".join(f"{v:.3g}" for v in np.quantile(ratio, q)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--cv", action="store_true", help="leave-one-training-site-out validation")
    parser.add_argument("--repeats", type=int, default=1, help="noise draws per seed")
    parser.add_argument(
        "--set", nargs="*", default=[], help="extra Setting fields key=value for all variants"
    )
    parser.add_argument(
        "--scales", action="store_true", help="print the design's per-feature spreads (first variant, seed)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    extra: dict[str, Any] = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        typ = type(getattr(Setting(), k))
        extra[k] = v in ("1", "true", "True") if typ is bool else typ(v)
    if args.scales:
        print_scales(dataclasses.replace(VARIANTS[args.variants[0]], **extra), args.seeds[0])
        return
    for name in args.variants:
        s = dataclasses.replace(VARIANTS[name], **extra)
        scores = [score(seed, s, cv=args.cv, repeats=args.repeats) for seed in args.seeds]
        print(
            f"{name:20s} {np.mean(scores):.4f} ± {np.std(scores, ddof=1) if len(scores) > 1 else 0:.3f}  "
            + " ".join(f"{x:.3f}" for x in scores),
            flush=True,
        )


if __name__ == "__main__":
    main()
