"""RAVDESS (Livingstone & Russo, PLoS ONE 2018): acted emotional speech, with face features for a quarter.

Reads ``<data.root>/ravdess/audio16k/Actor_XX/03-01-EE-II-SS-RR-AA.flac`` (all 1,440 speech
clips, 16 kHz mono) and ``<data.root>/ravdess/face_features.csv`` (56 per-clip facial
features for the 360 clips with statement 01, repetition 01). ``data.root`` may point at any
folder laid out the same way, e.g. the official release converted to 16 kHz FLAC.

**Samples.** One clip = one sample of ``data.seq_len`` frames. ``speech`` is the
``audio_features.AudioFrontEnd`` output (``data.audio_frontend`` logmel | mfcc, plus pitch
and deltas) or openSMILE eGeMAPS (``egemaps``: ``fedmer.data.egemaps``); ``face`` is the
clip's 56 features, constant over the frames. The 1,080 clips with no face features have face
mask False and zero face columns: a real missing modality.
``data.modalities`` picks a subset (``speech`` alone = audio-only); ``data.complete_only``
keeps only the clips that recorded every modality RAVDESS offers (the 360 with face features),
whichever modalities are selected: ``modalities=speech complete_only=true`` is audio alone on
the same 360 clips the fusion model sees.

**Labels** come from the file name: 8 emotions (``CLASS_NAMES``, the RAVDESS codes 01-08)
and intensity normal/strong (neutral has only normal). The face CSV's own ``emotion`` column
must agree with the name, which catches a misaligned CSV.

**Face scaling** uses fixed constants only: the expression probabilities and action units
are already in [0, 1]; mouth openness (pixels, 22-59 in the release) is divided by 100.

**Persons and sites.** Person = actor (01-24; odd male, even female). Sites are groups of
actors: males and females are shuffled separately by ``seed`` and interleaved, the sequence
is cut into ``num_sites`` contiguous chunks (so each site holds both genders), and the last
``data.test_persons_per_site`` actors of each chunk (rotated by the site index, so test
genders alternate) are held out for test. ``data.persons_per_site``,
``sequences_per_person`` and ``scenario`` are ignored: the recordings fix them.

**Cache.** Each actor's speech features are cached in ``<repo>/.fedmer_cache/ravdess/``
(``FEDMER_CACHE_DIR`` overrides the root), keyed by the front-end parameters and the names and
SHA-256 content hashes of the actor's FLAC files; writes are atomic and an unreadable cache file
is rebuilt with a warning. With ``complete_only`` only the kept clips' speech is extracted (15 of
an actor's 60, cached under their own key) unless the actor's 60 clips are cached already.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Collection
from pathlib import Path

import numpy as np

from fedmer.cache import REPO_ROOT, cache_dir
from fedmer.config import ConfigError, DataConfig
from fedmer.data.audio_features import SpeechFrontEnd, build_audio_frontend, read_flac
from fedmer.data.base import DatasetSplit, MultimodalDataset
from fedmer.data.digest import file_digest
from fedmer.data.registry import register_dataset

__all__ = [
    "CLASS_NAMES",
    "FACE_FEATURES",
    "FACE_FEATURE_COLUMNS",
    "INTENSITY_NAMES",
    "N_ACTORS",
    "assign_actor_sites",
    "default_cache_dir",
    "expected_clip_ids",
    "face_columns",
    "load_actor_speech",
    "load_clips",
    "load_ravdess",
    "parse_clip_id",
    "read_face_features",
    "resolve_root",
    "select_face",
    "speech_of_actors",
    "transform_face",
]

_log = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
INTENSITY_NAMES: tuple[str, ...] = ("normal", "strong")
N_ACTORS = 24
_FACE_BASES = (
    *("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"),
    *(f"AU{n:02d}" for n in (1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15, 17, 20, 23, 24, 25, 26, 28, 43)),
    "mouth_openness",
)
FACE_FEATURES: tuple[str, ...] = tuple(f"{b}_{s}" for s in ("mean", "std") for b in _FACE_BASES)
_FACE_SCALE = np.array([0.01 if f.startswith("mouth_openness") else 1.0 for f in FACE_FEATURES])
#: ``data.face_features``: the face columns a model reads, in this order (a subset of FACE_FEATURES).
FACE_FEATURE_COLUMNS: dict[str, tuple[str, ...]] = {
    "all": FACE_FEATURES,
    "means": tuple(f for f in FACE_FEATURES if f.endswith("_mean")),
}
_AUDIO_ID = re.compile(r"03-01-(0[1-8])-(0[12])-(0[12])-(0[12])-(\d\d)")
_FACE_FILE = re.compile(r"01-01-(0[1-8])-(0[12])-(0[12])-(0[12])-(\d\d)\.mp4")
_CACHE_VERSION = 1  # bump when the cached arrays change meaning (front-end changes have their own key)


def parse_clip_id(stem: str) -> tuple[int, int, int]:
    """``03-01-EE-II-SS-RR-AA`` -> (emotion index 0-7, intensity index 0-1, actor 1-24)."""
    m = _AUDIO_ID.fullmatch(stem)
    if m is None or not 1 <= int(m[5]) <= N_ACTORS or (m[1] == "01" and m[2] == "02"):
        raise ValueError(
            f"malformed RAVDESS speech file name {stem!r}: expected 03-01-EE-II-SS-RR-AA with emotion "
            "EE 01-08, intensity II 01-02 (neutral only 01), statement and repetition 01-02, actor AA 01-24"
        )
    return int(m[1]) - 1, int(m[2]) - 1, int(m[5])


def expected_clip_ids(actor: int) -> list[str]:
    """The 60 speech identifiers one actor recorded (sorted)."""
    return sorted(
        f"03-01-{e:02d}-{i:02d}-{s:02d}-{r:02d}-{actor:02d}"
        for e in range(1, 9)
        for i in ((1,) if e == 1 else (1, 2))
        for s in (1, 2)
        for r in (1, 2)
    )


def resolve_root(root: str) -> Path:
    """``data.root`` -> its ``ravdess`` folder; relative roots are taken from the repo root."""
    base = Path(root).expanduser()
    base = base if base.is_absolute() else REPO_ROOT / base
    folder = base / "ravdess"
    if not (folder / "audio16k").is_dir():
        raise ConfigError(
            f"invalid data.root={root!r}: {folder / 'audio16k'} does not exist; data.root must point at a "
            "folder holding ravdess/audio16k/Actor_01..Actor_24/03-01-EE-II-SS-RR-AA.flac (16 kHz mono) "
            "and ravdess/face_features.csv; an official RAVDESS release converted to that layout works too"
        )
    return folder


def default_cache_dir() -> Path:
    """``$FEDMER_CACHE_DIR/ravdess``, else ``<repo>/.fedmer_cache/ravdess`` (gitignored)."""
    return cache_dir("ravdess")


def _actor_files(folder: Path, actor: int) -> list[Path]:
    """The actor's 60 FLAC files in identifier order; error naming any bad, missing or extra file."""
    files = sorted(folder.glob("*.flac"))
    for f in files:
        if parse_clip_id(f.stem)[2] != actor:
            raise ValueError(f"{f} names actor {f.stem[-2:]} but lies in {folder.name}")
    expected = expected_clip_ids(actor)
    missing = sorted(set(expected) - {f.stem for f in files})
    if missing:
        raise ValueError(
            f"{folder} lacks {len(missing)} of its {len(expected)} speech clips, e.g. "
            + ", ".join(f"{m}.flac" for m in missing[:5])
        )
    return files


def _cache_key(folder: Path, stats: list[tuple[str, str]], frontend: SpeechFrontEnd) -> str:
    """Key of the features of the files ``stats`` (name, content digest) of one actor folder."""
    blob = json.dumps([_CACHE_VERSION, folder.name, stats, frontend.params()]).encode()
    return f"{folder.name}-{hashlib.sha256(blob).hexdigest()[:20]}"


def _selected(files: list[Path], clips: Collection[str] | None) -> list[Path]:
    """``files`` whose stem is one of ``clips`` (all of them when ``clips`` is None), in order."""
    return files if clips is None else [f for f in files if f.stem in clips]


def _cache_paths(
    folder: Path, frontend: SpeechFrontEnd, cache_dir: Path, clips: Collection[str] | None = None
) -> tuple[Path, Path]:
    """The cache file of the actor's 60 clips, and that of the clips in ``clips`` (the same file
    when ``clips`` is None); each FLAC is hashed once (content, not size+mtime)."""
    files = _actor_files(folder, int(folder.name.removeprefix("Actor_")))
    stats = [(f.name, file_digest(f)) for f in files]
    full = cache_dir / f"{_cache_key(folder, stats, frontend)}.npz"
    if clips is None:
        return full, full
    chosen = [s for s, f in zip(stats, files, strict=True) if f.stem in clips]
    return full, cache_dir / f"{_cache_key(folder, chosen, frontend)}.npz"


def speech_of_actors(
    actor_dirs: list[Path],
    kind: str,
    seq_len: int,
    cache_dir: Path,
    clips: Collection[str] | None = None,
    level_norm: bool = True,
) -> np.ndarray:
    """Every actor's speech features, in order; actors not cached yet are extracted on every core.

    ``clips`` (clip identifiers): only those clips, in identifier order, and only those are
    extracted when the cache is cold (``data.complete_only`` keeps 15 of each actor's 60: a
    quarter of the work); an actor whose 60 clips are cached already is read from that file.

    openSMILE and the numpy front-ends run one clip at a time on one core; a cold cache of 24
    actors took 278 s for eGeMAPS here. The workers (``fedmer.data.feature_worker``, one
    process per core) only fill the cache, whose files are written atomically; this process
    then reads every actor from it. A worker that fails is logged, and its actors are computed
    here, where a damaged file raises its usual error.
    """
    frontend = build_audio_frontend(kind, seq_len, level_norm=level_norm)
    keys = [_cache_paths(d, frontend, cache_dir, clips) for d in actor_dirs]
    # an actor whose 60 clips are cached is sliced from that file; otherwise the selection's own
    paths = [full if full.is_file() else chosen for full, chosen in keys]
    cold = [d for d, path in zip(actor_dirs, paths, strict=True) if not path.is_file()]
    workers = min(len(cold), len(os.sched_getaffinity(0)))
    if workers > 1:
        _log.info("extracting %s features of %d actors on %d processes", kind, len(cold), workers)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        only = [] if clips is None else [f"--clips={','.join(sorted(clips))}"]
        level = "1" if level_norm else "0"
        argv = [
            sys.executable,
            "-m",
            "fedmer.data.feature_worker",
            *only,
            kind,
            str(seq_len),
            level,
            str(cache_dir),
        ]
        procs = [
            subprocess.Popen(
                argv + [str(d) for d in cold[i::workers]],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(workers)
        ]
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                _log.warning("a feature worker failed (rc %d): %s", proc.returncode, err.strip()[-500:])
    parts = []
    for d, (full, _), path in zip(actor_dirs, keys, paths, strict=True):
        if path == full and clips is not None:  # the actor's 60 clips, cached: take the selection
            keep = [f.stem in clips for f in _actor_files(d, int(d.name.removeprefix("Actor_")))]
            parts.append(load_actor_speech(d, frontend, cache_file=full)[np.array(keep, bool)])
        else:
            parts.append(load_actor_speech(d, frontend, cache_file=path, clips=clips))
    return np.concatenate(parts)


def load_actor_speech(
    folder: Path,
    frontend: SpeechFrontEnd,
    cache_dir: Path | None = None,
    *,
    cache_file: Path | None = None,
    clips: Collection[str] | None = None,
) -> np.ndarray:
    """``(n, seq_len, n_features)`` float32 speech features of one actor, in identifier order:
    its 60 clips, or those whose identifier is in ``clips``.

    ``cache_file``: the cache file of these clips when the caller already keyed it (:func:`_cache_paths`).
    """
    actor = int(folder.name.removeprefix("Actor_"))
    files = _actor_files(folder, actor)
    path = cache_file
    if path is None and cache_dir is not None:
        path = _cache_paths(folder, frontend, cache_dir, clips)[1]
    files = _selected(files, clips)
    shape = (len(files), frontend.seq_len, frontend.n_features)
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                x = z["x"]
            if x.shape != shape or x.dtype != np.float32:
                raise ValueError(f"holds shape {x.shape} {x.dtype}, expected {shape} float32")
            return x
        except (OSError, ValueError, KeyError, EOFError) as err:
            _log.warning("ignoring unreadable cache file %s (%s); recomputing", path, err)
    x = np.stack([frontend(read_flac(f)) for f in files]) if files else np.zeros(shape, np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"non-finite speech features in {folder}; a FLAC file there is damaged")
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as fh:
                np.savez(fh, x=x)
            os.replace(fh.name, path)  # atomic: concurrent clients never read a half-written file
        except OSError as err:
            _log.warning("cannot write the feature cache %s (%s); continuing without it", path.parent, err)
    return x


#: Added to both sides of the log-odds so that 0 and 1 stay finite (log(0.01/1.01) = -4.6).
FACE_LOGODDS_EPS = 0.01


def transform_face(values: np.ndarray, kind: str) -> np.ndarray:
    """``data.face_transform``: the scaled face numbers as they are, or on the log-odds scale.

    Every face number is a probability, an intensity or a scaled openness in [0, 1]; most sit
    near 0, where a linear scale crowds differences that matter (0.01 vs 0.1) into a spread of
    0.03 that DP-SGD's noise drowns. Log-odds spread them to units. It looks at no data: the
    same fixed map for every clip, so it costs no privacy and needs no statistics release.
    """
    if kind == "none":
        return values
    if kind != "logodds":
        raise ConfigError(f"invalid data.face_transform={kind!r}: expected none or logodds")
    q = np.clip(values, 0.0, 1.0)
    return np.log((q + FACE_LOGODDS_EPS) / (1.0 + FACE_LOGODDS_EPS - q)).astype(np.float32)


def face_columns(kind: str) -> tuple[str, ...]:
    """``data.face_features``: the names of the face columns a model reads (``all``: the 56;
    ``means``: the 28 per-clip means, without the within-clip stds)."""
    if kind not in FACE_FEATURE_COLUMNS:
        raise ConfigError(
            f"invalid data.face_features={kind!r}: expected one of {', '.join(FACE_FEATURE_COLUMNS)}"
        )
    return FACE_FEATURE_COLUMNS[kind]


def select_face(values: np.ndarray, columns: tuple[str, ...] | list[str]) -> np.ndarray:
    """The ``columns`` (names of FACE_FEATURES) of one clip's (56,) face features, in that order."""
    unknown = [c for c in columns if c not in FACE_FEATURES]
    if unknown:
        raise ValueError(f"unknown face feature columns {unknown}; known: {', '.join(FACE_FEATURES)}")
    return values[[FACE_FEATURES.index(c) for c in columns]]


def read_face_features(path: Path, clip_ids: set[str]) -> dict[str, np.ndarray]:
    """Audio identifier -> (56,) float32 scaled face features; errors name the bad column or row."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; the face modality needs ravdess/face_features.csv")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in (*FACE_FEATURES, "file") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks the columns {', '.join(missing)}")
        rows = list(reader)
    out: dict[str, np.ndarray] = {}
    for line, row in enumerate(rows, start=2):
        m = _FACE_FILE.fullmatch(row["file"])
        if m is None:
            raise ValueError(f"{path} line {line}: file {row['file']!r} is not 01-01-EE-II-SS-RR-AA.mp4")
        clip = "03-01-" + row["file"][6:-4]
        if clip not in clip_ids:
            raise ValueError(f"{path} line {line}: {row['file']} has no speech clip {clip}.flac")
        if clip in out:
            raise ValueError(f"{path} line {line}: a second row for {row['file']}")
        emotion = CLASS_NAMES[int(m[1]) - 1]
        if row.get("emotion", emotion) != emotion:
            raise ValueError(f"{path} line {line}: emotion {row['emotion']!r} but {row['file']} is {emotion}")
        try:
            values = np.array([float(row[c]) for c in FACE_FEATURES])
        except ValueError as err:
            raise ValueError(f"{path} line {line}: non-numeric face feature ({err})") from err
        if not np.isfinite(values).all():
            raise ValueError(f"{path} line {line}: non-finite face features for {row['file']}")
        out[clip] = (values * _FACE_SCALE).astype(np.float32)
    return out


def assign_actor_sites(
    actors: np.ndarray, num_sites: int, test_per_site: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per actor (in the given order): site id and whether it is held out; genders interleaved."""
    if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 1:
        raise ConfigError(f"invalid num_sites={num_sites!r}: expected a positive integer")
    needed = num_sites * (1 + test_per_site)
    if len(actors) < needed:
        raise ConfigError(
            f"ravdess has {len(actors)} actors, but {num_sites} sites x (1 training + "
            f"data.test_persons_per_site={test_per_site} test) actors need {needed}; lower "
            "federation.num_clients or data.test_persons_per_site"
        )
    rng = np.random.default_rng(seed)
    male = rng.permutation(np.flatnonzero(actors % 2 == 1))
    female = rng.permutation(np.flatnonzero(actors % 2 == 0))
    order = [i for pair in zip(male, female, strict=False) for i in pair]
    order += [*male[len(female) :], *female[len(male) :]]
    site, is_test = np.empty(len(actors), np.int64), np.zeros(len(actors), bool)
    for s, chunk in enumerate(np.array_split(np.array(order), num_sites)):
        site[chunk] = s
        is_test[np.roll(chunk, s)[len(chunk) - test_per_site :]] = True
    return site, is_test


def load_clips(cfg: DataConfig) -> MultimodalDataset:
    """Every clip (after ``data.complete_only``), all at site 0: the data before the site split."""
    modalities = cfg.modality_list
    folder = resolve_root(cfg.root)
    actor_dirs = [folder / "audio16k" / f"Actor_{a:02d}" for a in range(1, N_ACTORS + 1)]
    absent = [d.name for d in actor_dirs if not d.is_dir()]
    if absent:
        raise ConfigError(f"{folder / 'audio16k'} lacks the actor folders {', '.join(absent)}")
    ids = [c for a in range(1, N_ACTORS + 1) for c in expected_clip_ids(a)]
    labels = np.array([parse_clip_id(c) for c in ids], dtype=np.int64)
    for d in actor_dirs:  # every actor's 60 files are checked before any face row or audio is read
        _actor_files(d, int(d.name.removeprefix("Actor_")))
    columns = face_columns(cfg.face_features)
    face = np.zeros((len(ids), len(columns)), np.float32)
    has_face = np.zeros(len(ids), bool)
    if "face" in modalities or cfg.complete_only:  # complete_only needs to know which clips have a face
        rows = read_face_features(folder / "face_features.csv", set(ids))
        for k, clip in enumerate(ids):
            if clip in rows:
                face[k] = transform_face(select_face(rows[clip], columns), cfg.face_transform)
                has_face[k] = True
    # complete_only: the clips that recorded every modality RAVDESS offers (the 360 with a face),
    # whichever are selected, so speech alone can be compared with fusion on the same clips.
    # Only their speech is extracted (a quarter of a cold cache's work).
    keep = has_face if cfg.complete_only else np.ones(len(ids), bool)
    kept = {c for c, k in zip(ids, keep, strict=True) if k} if cfg.complete_only else None
    speech = speech_of_actors(
        actor_dirs,
        cfg.audio_frontend,
        cfg.seq_len,
        default_cache_dir(),
        kept,
        level_norm=cfg.audio_level_norm,
    )
    n = int(keep.sum())
    parts = {"speech": (speech, np.ones(n, bool)), "face": (face[keep][:, None, :], has_face[keep])}
    widths = [parts[m][0].shape[2] for m in modalities]
    bounds = np.cumsum([0, *widths])
    x = np.zeros((n, cfg.seq_len, int(bounds[-1])), np.float32)
    mask = np.stack([parts[m][1] for m in modalities], axis=1)
    for j, m in enumerate(modalities):
        x[:, :, bounds[j] : bounds[j + 1]] = parts[m][0]
    _log.info(
        "ravdess: %d clips from %d actors, %d with face features; modalities %s, complete_only=%s -> %d",
        len(ids),
        N_ACTORS,
        int(has_face.sum()),
        ",".join(modalities),
        cfg.complete_only,
        int(keep.sum()),
    )
    return MultimodalDataset(
        x=x,
        mask=mask,
        y=labels[keep, 0],
        person=labels[keep, 2],
        site=np.zeros(int(keep.sum()), np.int64),
        modalities=modalities,
        feature_slices=tuple((int(a), int(b)) for a, b in itertools.pairwise(bounds)),
        class_names=CLASS_NAMES,
        intensity=labels[keep, 1],
        intensity_names=INTENSITY_NAMES,
    )


@register_dataset("ravdess", modalities=("speech", "face"))
def load_ravdess(cfg: DataConfig, num_sites: int, seed: int) -> DatasetSplit:
    """Train and held-out-actor test clips of RAVDESS speech (+ face), actors grouped into sites."""
    # Assign sites first: a federation too large for 24 actors fails before any audio is read.
    site_of, is_test = assign_actor_sites(
        np.arange(1, N_ACTORS + 1), num_sites, cfg.test_persons_per_site, seed
    )
    clips = load_clips(cfg)
    test = is_test[clips.person - 1]
    full = dataclasses.replace(clips, site=site_of[clips.person - 1])
    return DatasetSplit(train=full.subset(np.flatnonzero(~test)), test=full.subset(np.flatnonzero(test)))
