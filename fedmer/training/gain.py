"""Does a site's microphone gain change the predicted emotion? RAVDESS clips replayed at other gains.

A federation's sites record with different microphones and gain settings; a speech model that
reads the absolute level learns the site, not the emotion. :func:`gain_robustness` trains a
small centralised model (the configured network, pooled training clips, exact standardisation,
no DP: seconds on per-clip features) on the clips as recorded, then scores the held-out clips
with their waveform scaled by ``gain_db`` before the front-end (``+10 dB`` is clipped at
+-1, as an overdriven converter would) and reports UAR at each gain, and how many predictions
stay what they were at 0 dB.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from fedmer.config import ConfigError, ExperimentConfig
from fedmer.data.audio_features import SpeechFrontEnd, build_audio_frontend, read_flac
from fedmer.data.base import MultimodalDataset
from fedmer.data.feature_stats import exact_feature_stats
from fedmer.data.ravdess import N_ACTORS, assign_actor_sites, expected_clip_ids, load_clips, resolve_root
from fedmer.data.registry import sites_built
from fedmer.models import build_model_for
from fedmer.training.loops import make_loader, predict, seed_everything, train_epochs
from fedmer.training.metrics import classification_report

__all__ = ["clip_paths", "features_at_gain", "gain_robustness", "play_at_gain", "replay_all"]

log = logging.getLogger(__name__)


def play_at_gain(signal: np.ndarray, gain_db: float) -> tuple[np.ndarray, bool]:
    """The waveform scaled by ``gain_db``, clipped at +-1; and whether any sample clipped."""
    x = np.asarray(signal, dtype=np.float64) * 10.0 ** (gain_db / 20.0)
    clipped = bool(np.abs(x).max(initial=0.0) > 1.0)
    return np.clip(x, -1.0, 1.0), clipped


def clip_paths(cfg: ExperimentConfig) -> list[Path]:
    """The FLAC files of :func:`fedmer.data.ravdess.load_clips` ``(cfg.data)``, in its order.

    With ``complete_only`` these are the clips that have face features: statement 01,
    repetition 01 (``face_features.csv``'s design); the caller checks the labels agree.
    """
    folder = resolve_root(cfg.data.root) / "audio16k"
    ids = [c for a in range(1, N_ACTORS + 1) for c in expected_clip_ids(a)]
    if cfg.data.complete_only:
        ids = [c for c in ids if c.split("-")[4:6] == ["01", "01"]]
    return [folder / f"Actor_{c[-2:]}" / f"{c}.flac" for c in ids]


def features_at_gain(frontend: SpeechFrontEnd, paths: list[Path], gain_db: float) -> tuple[np.ndarray, int]:
    """``(N, seq_len, F)`` speech features of the clips played at ``gain_db``; and how many clipped."""
    out, n_clipped = [], 0
    for p in paths:
        x, clipped = play_at_gain(read_flac(p), gain_db)
        out.append(frontend(x))
        n_clipped += clipped
    return np.stack(out).astype(np.float32), n_clipped


def replay_all(
    frontend: SpeechFrontEnd, paths: list[Path], gains_db: tuple[float, ...]
) -> tuple[dict[float, np.ndarray], dict[float, int]]:
    """Every clip at 0 dB and each gain (for :func:`gain_robustness`'s ``replayed``); clip counts."""
    feats, clipped = {}, {}
    for g in (0.0, *gains_db):
        feats[g], clipped[g] = features_at_gain(frontend, paths, g)
    return feats, clipped


def _with_speech(data: MultimodalDataset, speech: np.ndarray) -> MultimodalDataset:
    """``data`` with its speech columns replaced."""
    lo, hi = data.feature_slices[data.modalities.index("speech")]
    x = data.x.copy()
    x[:, :, lo:hi] = speech
    return dataclasses.replace(data, x=x)


def gain_robustness(
    cfg: ExperimentConfig,
    gains_db: tuple[float, ...] = (-20.0, 10.0),
    epochs: int = 60,
    lr: float = 0.02,
    replayed: dict[float, np.ndarray] | None = None,
) -> dict[str, object]:
    """Train on the clips as recorded, score held-out clips at ``gains_db``; UAR and agreement.

    Returns ``uar`` (gain -> held-out UAR, 0 dB included), ``agreement`` (gain -> fraction of
    held-out clips whose prediction equals the 0 dB one), ``clipped`` (gain -> clips that
    clipped), ``n_test``. The split is the experiment's: ``sites_built(cfg)`` sites,
    ``data.test_persons_per_site`` held-out actors each, ``cfg.seed``. ``replayed`` (gain -> speech
    features of every clip of :func:`clip_paths`, 0 dB included) replaces the front-end's own
    output, e.g. a variant's, computed once for several seeds (:func:`replay_all`).
    """
    if cfg.data.name != "ravdess" or "speech" not in cfg.data.modality_list:
        raise ConfigError("gain robustness needs data.name=ravdess with the speech modality")
    clips = load_clips(cfg.data)
    paths = clip_paths(cfg)
    if len(paths) != len(clips):
        raise ValueError(
            f"{len(paths)} clip files for {len(clips)} loaded clips: the order cannot be matched"
        )
    _, is_test = assign_actor_sites(
        np.arange(1, N_ACTORS + 1), sites_built(cfg), cfg.data.test_persons_per_site, cfg.seed
    )
    if replayed is not None:
        if cfg.data.modality_list != ("speech",):
            raise ConfigError("replayed features need data.modalities=speech")
        clips = dataclasses.replace(clips, x=replayed[0.0], feature_slices=((0, replayed[0.0].shape[2]),))
    frontend = build_audio_frontend(cfg.data.audio_frontend, cfg.data.seq_len, cfg.data.audio_level_norm)
    test_idx = np.flatnonzero(is_test[clips.person - 1])
    train = clips.subset(np.flatnonzero(~is_test[clips.person - 1]))
    test = clips.subset(test_idx)
    test_paths = [paths[i] for i in test_idx]
    lo, hi = clips.feature_slices[clips.modalities.index("speech")]
    # Alignment (and determinism): the first held-out clip recomputed equals the cached one.
    if replayed is None and not np.allclose(
        frontend(read_flac(test_paths[0])), test.x[0, :, lo:hi], atol=1e-4
    ):
        raise ValueError(f"{test_paths[0]} does not match the loaded clip it should be (order or cache)")

    seed = seed_everything(cfg.seed, 0, -1 % 2**31)
    model = build_model_for(cfg, train)
    if model.standardizer is not None:
        model.set_feature_stats(exact_feature_stats(train))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    train_epochs(model, make_loader(train, cfg.federation.batch_size, seed), optimizer, epochs)

    base, _ = predict(model, test)
    uar = {0.0: float(classification_report(test.y, base, test.num_classes)["uar"])}
    agreement, clipped = {0.0: 1.0}, {0.0: 0}
    for g in gains_db:
        if replayed is None:
            speech, clipped[g] = features_at_gain(frontend, test_paths, g)
        else:
            speech, clipped[g] = replayed[g][test_idx], -1  # counted by replay_all
        pred, _ = predict(model, _with_speech(test, speech))
        uar[g] = float(classification_report(test.y, pred, test.num_classes)["uar"])
        agreement[g] = float(np.mean(pred == base))
        log.info("gain %+.0f dB: UAR %.3f, agreement %.3f, %d clipped", g, uar[g], agreement[g], clipped[g])
    return {"uar": uar, "agreement": agreement, "clipped": clipped, "n_test": len(test)}
