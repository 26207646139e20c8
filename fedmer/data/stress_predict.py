"""Stress-Predict (Iqbal et al., Sensors 2022): real wrist physiology, subjects grouped into sites.

Reads ``<data.root>/stress-predict/Raw_data/SXX/`` (the official release layout): Empatica
E4 ACC, BVP, EDA, HR and TEMP, plus ``tags_SXX.csv``, the event-button presses.

**Tags -> labels.** The protocol (paper and ``Processed_data/Time_logs.xlsx``) is consent,
baseline/questionnaire, Stroop test, relax, interview, relax, hyperventilation, relax,
questionnaire, relax. The seven tags t0..t6 of a regular session mark

    [t0, t1) Stroop -> stress      [t1, t2) relax -> baseline
    [t2, t3) interview -> stress   [t3, t4) relax -> baseline
    [t4, t5) hyperventilation -> stress   [t5, t6) relax -> baseline

and the seated period from recording start + 60 s (sensor settling) to t0 is baseline too.
Time after t6 (questionnaire, wrap-up) is dropped. This reproduces the stress intervals of
the authors' own labels (``Improved_All_Combined_hr_rsp_binary.csv``) to within a second.
S02-S04 carry two extra closing tags (9 in all); their first seven follow the same protocol,
as the authors' labels confirm. Any other session is **skipped with a WARNING** naming the
subject and the reason, and counted in the summary log: a tag count other than 7 or 9, tags
not strictly increasing or outside the recording, or an interval whose length does not fit
its task (``_PROTOCOL``). In the official release that skips five of 35 (any *other* session
off protocol is an error: a truncated or edited file must not quietly drop a subject): S01 (10 tags, an
extra mark between relax and interview), S06 (tags start at the end of the Stroop test, so
the "interview" lasts 293 s), S17, S18 and S30 (tags 12 h before the recording: a clock slip).

**Windows.** 60 s windows, 30 s hop, laid out from the start of each labelled interval and
kept only when wholly inside it. A window is ``data.seq_len`` frames; each frame holds the 8
``e4.PHYSIO_FEATURES`` (HR mean, EDA mean/std, TEMP mean, BVP std and mean |diff|, ACC
magnitude mean/std). 30 subjects give about 2,300 windows, about 40 % stress.

**Normalisation** is per subject from that subject's own data only: each feature is z-scored
with the mean and std of all frames of the subject's whole recording (settled part, labels
unused), then clipped to +-10. No statistic crosses subjects, so test subjects leak nothing.

**Layout.** Only ``physio`` is recorded; speech, face and can keep the 4-modality packed
layout as one all-zero column each, masked False (the model's encoders need width >= 1).
``data.modalities`` must include physio. Persons are subjects (person id = XX of SXX); sites
are hospitals: the valid subjects, shuffled by ``seed``, are cut into ``num_sites`` contiguous
chunks of near-equal size, and the last ``data.test_persons_per_site`` of each chunk are held
out for test. ``data.persons_per_site``, ``sequences_per_person`` and ``scenario`` are ignored:
the recordings fix how many subjects and windows there are.

**Caveat.** Every session runs the tasks in the same order, so the position of a window in
the session predicts its label (UAR 0.76 with no physiology at all); see
``bench/stress_predict_probe.py``, where a linear probe on the physio means reaches 0.68.

**Cache.** Each subject's windows are cached in ``<repo>/.fedmer_cache/stress_predict/``
(``FEDMER_CACHE_DIR`` overrides the root), keyed by the sizes and mtimes of its files and the
windowing parameters. Measured on 2 CPU cores: the whole dataset takes 7.4 s from scratch,
0.02 s from the cache (0.03 s including building the split).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmer.cache import REPO_ROOT, cache_dir
from fedmer.config import MODALITIES, ConfigError, DataConfig
from fedmer.data.base import DatasetSplit, MultimodalDataset
from fedmer.data.digest import file_digest
from fedmer.data.e4 import PHYSIO_FEATURES, SIGNAL_FILES, read_recording, read_tags
from fedmer.data.registry import register_dataset

__all__ = [
    "CLASS_NAMES",
    "HOP_S",
    "WINDOW_S",
    "SubjectWindows",
    "assign_sites",
    "default_cache_dir",
    "load_stress_predict",
    "load_subjects",
    "resolve_root",
]

_log = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("baseline", "stress")
WINDOW_S = 60.0
HOP_S = 30.0
_SETTLE_S = 60.0  # EDA and the optical sensor need about a minute on the wrist
_CLIP = 10.0
_CACHE_VERSION = 2  # bump when the features or the labelling change
#: Interval t_k..t_{k+1}: (task, label, shortest and longest plausible length in seconds).
_PROTOCOL: tuple[tuple[str, int, float, float], ...] = (
    ("Stroop test", 1, 180.0, 600.0),
    ("relax 1", 0, 120.0, 600.0),
    ("interview", 1, 400.0, 900.0),
    ("relax 2", 0, 120.0, 600.0),
    ("hyperventilation", 1, 60.0, 240.0),
    ("relax 3", 0, 120.0, 600.0),
)
_TAG_COUNTS = (7, 9)  # 9: S02-S04 also mark the questionnaire and the end of the session


@dataclass(frozen=True)
class SubjectWindows:
    """One subject's labelled windows, or why the subject was skipped."""

    subject: str  # "S05"
    x: np.ndarray  # (n, seq_len, len(PHYSIO_FEATURES)) float32, z-scored within the subject
    y: np.ndarray  # (n,) int64: 0 baseline, 1 stress
    start: np.ndarray  # (n,) float64 unix time each window begins (to audit the labels)
    skip_reason: str = ""  # non-empty: the session does not follow the protocol

    @property
    def person(self) -> int:
        return int(self.subject[1:])


def resolve_root(root: str) -> Path:
    """``data.root`` -> the ``Raw_data`` folder; relative roots are taken from the repo root."""
    base = Path(root).expanduser()
    base = base if base.is_absolute() else REPO_ROOT / base
    raw = base / "stress-predict" / "Raw_data"
    if not raw.is_dir():
        raise ConfigError(
            f"invalid data.root={root!r}: {raw} does not exist; data.root must point at a folder "
            "containing stress-predict/Raw_data/SXX/... (the official release layout)"
        )
    return raw


def _labelled_intervals(tags: np.ndarray, span: tuple[float, float]) -> list[tuple[float, float, int]]:
    """``(start, stop, label)`` per protocol interval; raises ``_ProtocolMismatchError`` on a misfit."""
    if len(tags) not in _TAG_COUNTS:
        raise _ProtocolMismatchError(f"{len(tags)} tags; the protocol has 7 (9 with closing marks)")
    t = tags[:7]
    if np.any(np.diff(t) <= 0):
        raise _ProtocolMismatchError(f"tags not strictly increasing: {t.tolist()}")
    if t[0] < span[0] or t[-1] > span[1]:
        raise _ProtocolMismatchError(
            f"tags {t[0]:.0f}..{t[-1]:.0f} fall outside the recording {span[0]:.0f}..{span[1]:.0f}"
        )
    intervals = [(span[0] + _SETTLE_S, float(t[0]), 0)]
    for k, (task, label, low, high) in enumerate(_PROTOCOL):
        length = t[k + 1] - t[k]
        if not low <= length <= high:
            raise _ProtocolMismatchError(
                f"tags {k + 1}-{k + 2} ({task}) are {length:.0f} s apart, expected {low:.0f}-{high:.0f} s"
            )
        intervals.append((float(t[k]), float(t[k + 1]), label))
    return intervals


class _ProtocolMismatchError(Exception):
    """The session does not follow the protocol; the message says how."""


def _compute(folder: Path, seq_len: int) -> SubjectWindows:
    """Parse one subject folder and cut its labelled, normalised windows."""
    subject = folder.name
    rec = read_recording(folder)
    try:
        intervals = _labelled_intervals(read_tags(folder / f"tags_{subject}.csv"), rec.span)
    except _ProtocolMismatchError as why:
        none = np.zeros((0, seq_len, len(PHYSIO_FEATURES)), np.float32)
        return SubjectWindows(subject, none, np.zeros(0, np.int64), np.zeros(0), skip_reason=str(why))
    frame = WINDOW_S / seq_len
    start, stop = rec.span[0] + _SETTLE_S, rec.span[1]
    whole = rec.frame_features(start + frame * np.arange(int((stop - start) / frame) + 1))
    mean, std = whole.mean(axis=0), whole.std(axis=0) + 1e-6
    starts, labels = [], []
    for a, b, label in intervals:
        n = int(np.floor((b - a - WINDOW_S) / HOP_S + 1e-9)) + 1 if b - a >= WINDOW_S else 0
        starts.append(a + HOP_S * np.arange(n))
        labels.append(np.full(n, label, dtype=np.int64))
    edges = np.concatenate(starts)[:, None] + frame * np.arange(seq_len + 1)
    x = np.clip((rec.frame_features(edges) - mean) / std, -_CLIP, _CLIP).astype(np.float32)
    return SubjectWindows(subject, x, np.concatenate(labels), np.concatenate(starts))


def _cache_key(folder: Path, seq_len: int) -> str:
    files = [folder / f"{name}.csv" for name in SIGNAL_FILES] + [folder / f"tags_{folder.name}.csv"]
    stats = [(f.name, file_digest(f)) for f in files]  # content, not size+mtime (cp -p, rsync -a)
    params = [_CACHE_VERSION, WINDOW_S, HOP_S, _SETTLE_S, _CLIP, seq_len, list(_PROTOCOL), list(_TAG_COUNTS)]
    blob = json.dumps([folder.name, stats, params]).encode()
    return f"{folder.name}-{hashlib.sha256(blob).hexdigest()[:20]}"


def _cached(folder: Path, seq_len: int, cache_dir: Path | None) -> SubjectWindows:
    """``_compute`` through the on-disk cache (a broken or unwritable cache only costs time)."""
    if cache_dir is None:
        return _compute(folder, seq_len)
    path = cache_dir / f"{_cache_key(folder, seq_len)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return SubjectWindows(folder.name, z["x"], z["y"], z["start"], str(z["skip_reason"]))
        except (OSError, ValueError, KeyError) as err:
            _log.warning("ignoring unreadable cache file %s (%s); recomputing", path, err)
    result = _compute(folder, seq_len)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".tmp", delete=False) as fh:
            np.savez(fh, x=result.x, y=result.y, start=result.start, skip_reason=np.array(result.skip_reason))
        os.replace(fh.name, path)  # atomic: concurrent clients never read a half-written file
    except OSError as err:
        _log.warning("cannot write the feature cache %s (%s); continuing without it", cache_dir, err)
    return result


def default_cache_dir() -> Path:
    """``$FEDMER_CACHE_DIR/stress_predict``, else ``<repo>/.fedmer_cache/stress_predict`` (gitignored)."""
    return cache_dir("stress_predict")


#: The official release's sessions that do not follow the protocol (module docstring): skipped with
#: a warning. Any other off-protocol session is an error, not a silent loss of a subject.
KNOWN_OFF_PROTOCOL = frozenset({"S01", "S06", "S17", "S18", "S30"})


def load_subjects(
    raw: Path, seq_len: int, cache_dir: Path | None = None
) -> tuple[list[SubjectWindows], dict[str, str]]:
    """Windows of every protocol-conforming subject under ``raw`` and ``{subject: skip reason}``."""
    folders = sorted(p for p in raw.iterdir() if p.is_dir() and re.fullmatch(r"S\d+", p.name))
    if not folders:
        raise ConfigError(f"{raw} holds no SXX subject folders; is data.root the official release layout?")
    kept, skipped = [], {}
    for folder in folders:
        result = _cached(folder, seq_len, cache_dir)
        if result.skip_reason and result.subject not in KNOWN_OFF_PROTOCOL:
            raise ConfigError(
                f"stress_predict: {folder} does not follow the study protocol ({result.skip_reason}); "
                f"in the official release only {', '.join(sorted(KNOWN_OFF_PROTOCOL))} do, so this "
                "session was probably truncated or edited: restore it from the release, or move the "
                "folder out of data.root to train without this subject"
            )
        if result.skip_reason:
            _log.warning("stress_predict: skipping %s: %s", result.subject, result.skip_reason)
            skipped[result.subject] = result.skip_reason
        else:
            kept.append(result)
    n = sum(len(s.y) for s in kept)
    stress = sum(int(s.y.sum()) for s in kept)
    _log.info(
        "stress_predict: %d subjects, %d windows (%.1f%% stress); skipped %d: %s",
        len(kept),
        n,
        100.0 * stress / max(n, 1),
        len(skipped),
        ", ".join(skipped) or "none",
    )
    return kept, skipped


def assign_sites(
    n_subjects: int, num_sites: int, test_per_site: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per subject (in the given order): site id and whether it is held out for test."""
    if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 1:
        raise ConfigError(f"invalid num_sites={num_sites!r}: expected a positive integer")
    needed = num_sites * (1 + test_per_site)
    if n_subjects < needed:
        raise ConfigError(
            f"stress_predict has {n_subjects} usable subjects, but {num_sites} sites x (1 training + "
            f"data.test_persons_per_site={test_per_site} test) subjects need {needed}; lower "
            "federation.num_clients or data.test_persons_per_site"
        )
    site, is_test = np.empty(n_subjects, np.int64), np.zeros(n_subjects, bool)
    order = np.random.default_rng(seed).permutation(n_subjects)
    for s, chunk in enumerate(np.array_split(order, num_sites)):
        site[chunk] = s
        is_test[chunk[len(chunk) - test_per_site :]] = True
    return site, is_test


@register_dataset("stress_predict")
def load_stress_predict(cfg: DataConfig, num_sites: int, seed: int) -> DatasetSplit:
    """Train and held-out-subject test windows of Stress-Predict, subjects grouped into sites."""
    if "physio" not in cfg.modality_list:
        raise ConfigError(f"invalid data.modalities={cfg.modalities!r}: stress_predict records only physio")
    subjects, _ = load_subjects(resolve_root(cfg.root), cfg.seq_len, default_cache_dir())
    site_of, is_test = assign_sites(len(subjects), num_sites, cfg.test_persons_per_site, seed)
    width = {m: len(PHYSIO_FEATURES) if m == "physio" else 1 for m in MODALITIES}
    bounds = np.cumsum([0, *(width[m] for m in MODALITIES)])
    slices = tuple((int(a), int(b)) for a, b in itertools.pairwise(bounds))
    a, b = slices[MODALITIES.index("physio")]

    def build(rows: list[int]) -> MultimodalDataset:
        parts = [subjects[i] for i in rows]
        n = sum(len(p.y) for p in parts)
        x = np.zeros((n, cfg.seq_len, int(bounds[-1])), np.float32)
        x[:, :, a:b] = np.concatenate([p.x for p in parts])
        mask = np.zeros((n, len(MODALITIES)), bool)
        mask[:, MODALITIES.index("physio")] = True
        return MultimodalDataset(
            x=x,
            mask=mask,
            y=np.concatenate([p.y for p in parts]),
            person=np.concatenate([np.full(len(p.y), p.person, np.int64) for p in parts]),
            site=np.concatenate([np.full(len(subjects[i].y), site_of[i], np.int64) for i in rows]),
            modalities=MODALITIES,
            feature_slices=slices,
            class_names=CLASS_NAMES,
        )

    train = [i for i in range(len(subjects)) if not is_test[i]]
    test = [i for i in range(len(subjects)) if is_test[i]]
    return DatasetSplit(train=build(train), test=build(test))
