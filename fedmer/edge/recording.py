"""From a recording on disk to the model's packed input, with the bundle's own front-ends.

An edge device has a microphone (and maybe a face tracker), not a dataset: this module turns
a 16 kHz mono audio file (and, for models with a face modality, the clip's row of a
RAVDESS-style ``face_features.csv``) into the ``(1, seq_len, F)`` features and ``(1, M)``
mask the model was trained on, using exactly the front-end settings stored in the bundle.
Every problem (missing file, wrong sample rate, a model that reads sensors a recording cannot
give, a front-end that differs from the one the model was trained with) is a
:class:`RecordingError` with a one-line message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmer.data.audio_features import (
    SAMPLE_RATE,
    SpeechFrontEnd,
    build_audio_frontend,
    level_norm_of,
    read_flac,
)
from fedmer.data.ravdess import (
    CLASS_NAMES,
    FACE_FEATURES,
    N_ACTORS,
    expected_clip_ids,
    parse_clip_id,
    read_face_features,
    select_face,
    transform_face,
)
from fedmer.edge.bundle import BundleMeta

__all__ = [
    "Recording",
    "RecordingError",
    "Segment",
    "audio_frontend",
    "concat_recordings",
    "pack",
    "read_face_row",
    "true_label",
]


class RecordingError(ValueError):
    """The recording, or the model asked to classify it, cannot be used; says why in one line."""


@dataclass(frozen=True)
class Segment:
    """One source clip's span inside a (possibly concatenated) signal."""

    name: str
    start_s: float
    end_s: float
    label: str | None  # the emotion its RAVDESS file name says, None for other names


@dataclass(frozen=True)
class Recording:
    """A mono 16 kHz signal and the clips it is made of."""

    signal: np.ndarray
    segments: tuple[Segment, ...]

    @property
    def duration_s(self) -> float:
        return len(self.signal) / SAMPLE_RATE


def true_label(path: Path) -> str | None:
    """The emotion a RAVDESS speech file name encodes (``03-01-EE-...``), else None."""
    try:
        return CLASS_NAMES[parse_clip_id(path.stem)[0]]
    except ValueError:
        return None


def audio_frontend(meta: BundleMeta) -> SpeechFrontEnd:
    """The speech front-end the model was trained with; refuses a model that has none, or a drifted one."""
    settings = meta.frontends.get("speech", {})
    if settings.get("type") != "audio":
        raise RecordingError(
            f"model/modality mismatch: the model reads {', '.join(meta.modalities)} from "
            f"data.name={meta.data.get('name')!r}, not speech from an audio front-end; "
            "fedmer predict needs a model trained on RAVDESS audio (data.name=ravdess)"
        )
    stored = {k: v for k, v in settings.items() if k not in ("type", "feature_names")}
    fe = build_audio_frontend(str(settings["kind"]), int(settings["seq_len"]), level_norm_of(stored))
    if stored != fe.params():
        raise RecordingError(
            f"the model was trained with audio front-end {stored}, this FedMER computes {fe.params()}: "
            "features would not match; use the FedMER version that trained it"
        )
    return fe


def _read(path: Path) -> np.ndarray:
    if not path.is_file():
        raise RecordingError(f"no audio file at {path}")
    try:
        return read_flac(path)
    except ValueError as err:
        raise RecordingError(str(err)) from None


def concat_recordings(paths: Sequence[Path], gap_s: float = 0.0) -> Recording:
    """The files one after another (``gap_s`` of silence between), as one stream."""
    if not paths:
        raise RecordingError("no audio file given")
    parts, segments, t = [], [], 0
    gap = np.zeros(round(gap_s * SAMPLE_RATE))
    for i, p in enumerate(paths):
        if i:
            parts.append(gap)
            t += len(gap)
        x = _read(Path(p))
        segments.append(
            Segment(Path(p).name, t / SAMPLE_RATE, (t + len(x)) / SAMPLE_RATE, true_label(Path(p)))
        )
        parts.append(x)
        t += len(x)
    return Recording(np.concatenate(parts), tuple(segments))


def read_face_row(meta: BundleMeta, csv_path: Path, audio_path: Path) -> np.ndarray:
    """The audio clip's scaled face features from a RAVDESS-style ``face_features.csv``."""
    if "face" not in meta.modalities:
        raise RecordingError(
            "model/modality mismatch: face features given, but the model reads only "
            + ", ".join(meta.modalities)
        )
    if not csv_path.is_file():
        raise RecordingError(f"no face-feature file at {csv_path}")
    try:
        parse_clip_id(audio_path.stem)
        rows = read_face_features(csv_path, {c for a in range(1, N_ACTORS + 1) for c in expected_clip_ids(a)})
    except ValueError as err:
        raise RecordingError(f"face features: {err}") from None
    if audio_path.stem not in rows:
        raise RecordingError(
            f"{csv_path} has no face features for {audio_path.stem} (expected a row for "
            f"01-{audio_path.stem[3:]}.mp4)"
        )
    # the columns the model was trained on, as the bundle lists them (data.face_features)
    columns = list(meta.frontends.get("face", {}).get("columns", FACE_FEATURES))
    try:
        values = select_face(rows[audio_path.stem], columns)
    except ValueError as err:
        raise RecordingError(f"bundle's face columns: {err}") from None
    return transform_face(values, str(meta.data.get("face_transform", "none")))


def pack(
    meta: BundleMeta, speech: np.ndarray, face: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(1, T, F)`` float32 features and ``(1, M)`` float32 mask; unrecorded modalities masked out."""
    x = np.zeros((1, meta.seq_len, meta.num_features), np.float32)
    mask = np.zeros((1, len(meta.modalities)), np.float32)
    given = {
        "speech": speech,
        "face": None if face is None else np.broadcast_to(face, (meta.seq_len, len(face))),
    }
    for j, (m, (a, b)) in enumerate(zip(meta.modalities, meta.feature_slices, strict=True)):
        value = given.get(m)
        if value is None:
            continue
        if value.shape != (meta.seq_len, b - a):
            raise RecordingError(
                f"{m} features of shape {value.shape}; the model expects {(meta.seq_len, b - a)}"
            )
        x[0, :, a:b], mask[0, j] = value, 1.0
    return x, mask
