"""Speech front-end in numpy: log-mel and MFCC frames, pooled to a fixed number of segments.

No torchaudio or librosa: the pipeline is short and every step is pinned by property tests.

* **STFT**: 25 ms periodic Hann window (400 samples at 16 kHz), 10 ms hop (160), 512-point
  FFT. The signal is zero-padded at the end so every sample falls in a frame; a clip shorter
  than one window gives one frame. Power is divided by ``(sum(window) / 2) ** 2`` so that a
  full-scale sine peaks at 1 (0 dBFS): levels are absolute, comparable across clips.
* **Mel filterbank**: ``N_MELS`` triangles with peak 1, equally spaced on the **HTK mel
  scale** ``mel = 2595 log10(1 + f / 700)`` from 0 Hz to Nyquist (8 kHz).
* **Log with a floor**: ``10 log10(max(E, 1e-10))`` (a floor of -100 dBFS, so silence stays
  finite), then the **fixed** affine map ``(dB + 80) / 20``: silence sits at -1, RAVDESS
  speech bands mostly in [0, 2.5]. These are constants, not statistics: nothing is pooled
  across clips, actors or clients, so a federation can apply the same map on every client.
* **MFCC**: orthonormal DCT-II of the scaled log-mel frame, the first ``N_MFCC`` coefficients.
  A gain change shifts every log-mel band equally, hence only c0.
* **Pitch**: per frame (40 ms Hann, same frame starts), the normalised autocorrelation
  (window bias removed) is searched for a period of 70-500 Hz; the frame gets ``voicing``
  (its peak, in [0, 1]) and ``log2(F0 / 100 Hz)`` if voicing > 0.5, else 0. Prosody is a
  main cue to emotion in acted speech, and a spectral envelope alone does not carry it.
* **Deltas**: static coefficients and pitch are extended with their temporal derivative
  (HTK regression over +-2 frames) before pooling, so a segment also says how fast they move.
* **Trimming**: leading and trailing frames more than 40 dB below the clip's loudest frame
  are dropped (a per-clip rule), so the segments cover the utterance, not the silence.
* **Pooling**: frames are averaged over ``seq_len`` equal time segments, so any clip becomes
  a ``(seq_len, n_features)`` array; a clip with fewer frames than segments repeats frames.

Why these sizes: 40 mel bands is the common choice for 16 kHz speech emotion work and keeps
every band at least one FFT bin wide; 20 MFCCs keep the spectral envelope and drop pitch
harmonics detail.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = [
    "AUDIO_FEATURE_VERSION",
    "DB_FLOOR",
    "HOP",
    "LEVEL_DBFS",
    "N_FFT",
    "SAMPLE_RATE",
    "WINDOW",
    "AudioFrontEnd",
    "SpeechFrontEnd",
    "build_audio_frontend",
    "dct_ii",
    "deltas",
    "frame_power",
    "hz_to_mel",
    "level_norm_of",
    "log_mel",
    "mel_filterbank",
    "mel_to_hz",
    "mfcc",
    "normalise_level",
    "pitch",
    "pool_segments",
    "read_flac",
    "speech_span",
]

SAMPLE_RATE = 16_000
WINDOW = 400  # 25 ms
HOP = 160  # 10 ms
N_FFT = 512
N_MELS = 40
N_MFCC = 20
DB_FLOOR = -100.0  # dBFS: log floor, keeps silence finite
_DB_OFFSET, _DB_SCALE = 80.0, 20.0  # fixed map dBFS -> (dB + 80) / 20
_F0_RANGE = (70.0, 500.0)  # Hz searched for the pitch period
_PITCH_WINDOW = 640  # 40 ms
_VOICED = 0.5  # normalised autocorrelation above which a frame counts as voiced
_TRIM_DB = 40.0
_DELTA_WIDTH = 2
#: Bump when anything above changes: the loaders' feature caches are keyed by it.
AUDIO_FEATURE_VERSION = 1


#: Target RMS of a level-normalised waveform (dBFS; RAVDESS clips' median is about -41).
LEVEL_DBFS = -40.0
_SILENCE_RMS = 1e-7  # below this a clip is digital silence: left as it is


def normalise_level(signal: np.ndarray, level_dbfs: float = LEVEL_DBFS) -> np.ndarray:
    """The waveform scaled to an RMS of ``level_dbfs``: a recording gain no longer shows."""
    x = np.asarray(signal, dtype=np.float64).reshape(-1)
    rms = float(np.sqrt(np.mean(x * x))) if x.size else 0.0
    return x if rms < _SILENCE_RMS else x * (10.0 ** (level_dbfs / 20.0) / rms)


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    """Inverse of ``hz_to_mel``."""
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE, fmin: float = 0.0
) -> np.ndarray:
    """``(n_mels, n_fft // 2 + 1)`` triangles (peak 1) equally spaced in mel from fmin to Nyquist."""
    fmax = sample_rate / 2.0
    if not 0.0 <= fmin < fmax:
        raise ValueError(f"invalid fmin={fmin}: expected 0 <= fmin < {fmax} (Nyquist)")
    centres = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    bins = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    lo, mid, hi = centres[:-2, None], centres[1:-1, None], centres[2:, None]
    up = (bins[None, :] - lo) / (mid - lo)
    down = (hi - bins[None, :]) / (hi - mid)
    fb = np.clip(np.minimum(up, down), 0.0, None)
    empty = np.flatnonzero(fb.max(axis=1) <= 0.0)
    if empty.size:
        raise ValueError(
            f"n_mels={n_mels} is too many for n_fft={n_fft} at {sample_rate} Hz: bands {empty.tolist()} "
            "contain no FFT bin; use fewer mel bands or a longer FFT"
        )
    return fb


_HANN = np.hanning(WINDOW + 1)[:-1]  # periodic Hann


def _frames(signal: np.ndarray) -> np.ndarray:
    """``(n_frames, WINDOW)`` views; the end is zero-padded so every sample is in a frame."""
    x = np.asarray(signal, dtype=np.float64).reshape(-1)
    n_frames = 1 + max(0, -(-(len(x) - WINDOW) // HOP))
    x = np.pad(x, (0, (n_frames - 1) * HOP + WINDOW - len(x)))
    return np.lib.stride_tricks.sliding_window_view(x, WINDOW)[::HOP]


def frame_power(signal: np.ndarray) -> np.ndarray:
    """``(n_frames, N_FFT // 2 + 1)`` power spectra, scaled so a full-scale sine peaks at 1."""
    spec = np.fft.rfft(_frames(signal) * _HANN, n=N_FFT, axis=1)
    return (spec.real**2 + spec.imag**2) / (_HANN.sum() / 2.0) ** 2


def pitch(signal: np.ndarray) -> np.ndarray:
    """``(n_frames, 2)``: ``log2(F0 / 100 Hz)`` (0 when unvoiced) and voicing in [0, 1].

    Frames start where the STFT frames start but span ``_PITCH_WINDOW`` (40 ms): three periods
    of a 75 Hz voice. The period is the shortest lag whose normalised autocorrelation is a local
    peak within 10 % of the best one, which avoids picking a multiple of the period.
    """
    x = np.asarray(signal, dtype=np.float64).reshape(-1)
    n_frames = len(_frames(x))
    x = np.pad(x, (0, (n_frames - 1) * HOP + _PITCH_WINDOW - len(x)))
    frames = np.lib.stride_tricks.sliding_window_view(x, _PITCH_WINDOW)[::HOP]
    frames = frames - frames.mean(axis=1, keepdims=True)
    window = np.hanning(_PITCH_WINDOW + 1)[:-1]
    n = 2 * N_FFT  # no circular wrap-around for the lags searched
    spec = np.fft.rfft(frames * window, n=n, axis=1)
    acf = np.fft.irfft(spec.real**2 + spec.imag**2, n=n, axis=1)
    wacf = np.fft.irfft(np.abs(np.fft.rfft(window, n=n)) ** 2, n=n)  # the window's own decay
    lo, hi = int(SAMPLE_RATE / _F0_RANGE[1]), int(SAMPLE_RATE / _F0_RANGE[0])
    energy = acf[:, :1] / wacf[0]
    norm = acf[:, lo - 1 : hi + 2] / wacf[lo - 1 : hi + 2] / np.maximum(energy, 1e-12)
    inner = norm[:, 1:-1]
    peak = (inner >= norm[:, :-2]) & (inner >= norm[:, 2:])
    best = np.where(peak, inner, -np.inf).max(axis=1, keepdims=True)
    lag = lo + np.argmax(peak & (inner >= 0.9 * best), axis=1)
    voicing = np.clip(best[:, 0], 0.0, 1.0)
    voicing[energy[:, 0] < 10.0 ** (DB_FLOOR / 10.0)] = 0.0  # silence: no pitch
    log_f0 = np.where(voicing > _VOICED, np.log2(SAMPLE_RATE / lag / 100.0), 0.0)
    return np.stack([log_f0, voicing], axis=1)


_FILTERBANKS: dict[int, np.ndarray] = {}


def log_mel(signal: np.ndarray, n_mels: int = N_MELS) -> np.ndarray:
    """``(n_frames, n_mels)`` log-mel energies: ``(max(dBFS, -100) + 60) / 20``."""
    if n_mels not in _FILTERBANKS:
        _FILTERBANKS[n_mels] = mel_filterbank(n_mels)
    energy = frame_power(signal) @ _FILTERBANKS[n_mels].T
    db = 10.0 * np.log10(np.maximum(energy, 10.0 ** (DB_FLOOR / 10.0)))
    return (db + _DB_OFFSET) / _DB_SCALE


def dct_ii(x: np.ndarray, n: int) -> np.ndarray:
    """First ``n`` orthonormal DCT-II coefficients along the last axis."""
    k = x.shape[-1]
    basis = np.cos(np.pi / k * (np.arange(k)[None, :] + 0.5) * np.arange(n)[:, None])
    basis *= np.sqrt(2.0 / k)
    basis[0] /= np.sqrt(2.0)
    return x @ basis.T


def mfcc(signal: np.ndarray, n_mfcc: int = N_MFCC, n_mels: int = N_MELS) -> np.ndarray:
    """``(n_frames, n_mfcc)`` cepstra: DCT-II of the log-mel frames."""
    if not 1 <= n_mfcc <= n_mels:
        raise ValueError(f"invalid n_mfcc={n_mfcc}: expected 1..n_mels={n_mels}")
    return dct_ii(log_mel(signal, n_mels), n_mfcc)


def deltas(frames: np.ndarray, width: int = _DELTA_WIDTH) -> np.ndarray:
    """HTK regression deltas over +-``width`` frames (edges repeated); same shape as ``frames``."""
    padded = np.pad(frames, ((width, width), (0, 0)), mode="edge")
    n = len(frames)
    num = sum(
        k * (padded[width + k : width + k + n] - padded[width - k : width - k + n])
        for k in range(1, width + 1)
    )
    return num / (2.0 * sum(k * k for k in range(1, width + 1)))


def speech_span(log_mel_frames: np.ndarray, trim_db: float = _TRIM_DB) -> slice:
    """Frames from the first to the last one within ``trim_db`` of the clip's loudest frame."""
    loudest = log_mel_frames.max(axis=1)
    keep = np.flatnonzero(loudest >= loudest.max() - trim_db / _DB_SCALE)
    return slice(int(keep[0]), int(keep[-1]) + 1)


def pool_segments(frames: np.ndarray, seq_len: int) -> np.ndarray:
    """Mean of ``frames`` over ``seq_len`` equal time segments -> ``(seq_len, n_features)``."""
    n = len(frames)
    if n < 1 or seq_len < 1:
        raise ValueError(f"cannot pool {n} frames into seq_len={seq_len} segments")
    edges = np.linspace(0.0, n, seq_len + 1)
    start = np.minimum(np.floor(edges[:-1]).astype(np.int64), n - 1)
    stop = np.maximum(np.floor(edges[1:]).astype(np.int64), start + 1)
    csum = np.concatenate([np.zeros((1, frames.shape[1])), np.cumsum(frames, axis=0)])
    return (csum[stop] - csum[start]) / (stop - start)[:, None]


@dataclass(frozen=True)
class AudioFrontEnd:
    """Clip -> ``(seq_len, n_features)`` float32: log-mel or MFCC, pitch, their deltas; pooled."""

    kind: str = "logmel"  # "logmel" | "mfcc"
    seq_len: int = 20
    #: Scale each clip to a fixed RMS first (gain-robust: README, "Recording gain").
    level_norm: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("logmel", "mfcc"):
            raise ValueError(f"invalid audio front-end {self.kind!r}: expected 'logmel' or 'mfcc'")
        if self.seq_len < 1:
            raise ValueError(f"invalid seq_len={self.seq_len}: expected a positive integer")

    @property
    def n_static(self) -> int:
        return N_MELS if self.kind == "logmel" else N_MFCC

    @property
    def n_features(self) -> int:
        return 2 * (self.n_static + 2)  # (spectral + log F0 + voicing) and their deltas

    @property
    def feature_names(self) -> tuple[str, ...]:
        static = [f"mel{i:02d}" if self.kind == "logmel" else f"c{i:02d}" for i in range(self.n_static)]
        static += ["log2_f0", "voicing"]
        return (*static, *(f"d_{name}" for name in static))

    def params(self) -> dict[str, object]:
        """Everything the output depends on (for cache keys)."""
        return {
            "version": AUDIO_FEATURE_VERSION,
            "kind": self.kind,
            "seq_len": self.seq_len,
            "sr": SAMPLE_RATE,
            "window": WINDOW,
            "hop": HOP,
            "n_fft": N_FFT,
            "n_mels": N_MELS,
            "n_mfcc": N_MFCC,
            "floor_db": DB_FLOOR,
            "db_map": [_DB_OFFSET, _DB_SCALE],
            "delta_width": _DELTA_WIDTH,
            "f0_range": list(_F0_RANGE),
            "voiced": _VOICED,
            "pitch_window": _PITCH_WINDOW,
            "trim_db": _TRIM_DB,
        } | ({"level_norm": LEVEL_DBFS} if self.level_norm else {})  # old keys unchanged without it

    def frames(self, signal: np.ndarray) -> np.ndarray:
        """Unpooled, trimmed ``(n_frames, n_features)``: static features, then their deltas."""
        signal = normalise_level(signal) if self.level_norm else signal
        lm = log_mel(signal)
        spectral = lm if self.kind == "logmel" else dct_ii(lm, N_MFCC)
        static = np.concatenate([spectral, pitch(signal)], axis=1)
        return np.concatenate([static, deltas(static)], axis=1)[speech_span(lm)]

    def __call__(self, signal: np.ndarray) -> np.ndarray:
        return pool_segments(self.frames(signal), self.seq_len).astype(np.float32)


class SpeechFrontEnd(Protocol):
    """What the loaders and their caches need of a speech front-end (numpy or eGeMAPS)."""

    @property
    def kind(self) -> str: ...
    @property
    def seq_len(self) -> int: ...
    @property
    def n_features(self) -> int: ...
    @property
    def feature_names(self) -> tuple[str, ...]: ...
    def params(self) -> dict[str, object]: ...
    def __call__(self, signal: np.ndarray) -> np.ndarray: ...


def build_audio_frontend(kind: str, seq_len: int, level_norm: bool = True) -> SpeechFrontEnd:
    """``data.audio_frontend`` -> its front-end: logmel | mfcc (numpy, here) or egemaps (openSMILE),
    each clip scaled to a fixed RMS first when ``level_norm`` (``data.audio_level_norm``)."""
    if kind == "egemaps":
        from fedmer.data.egemaps import EgemapsFrontEnd  # openSMILE loads only when asked for

        return EgemapsFrontEnd(seq_len, level_norm=level_norm)
    return AudioFrontEnd(kind, seq_len, level_norm=level_norm)


def level_norm_of(params: dict[str, object]) -> bool:
    """Whether a front-end with these :meth:`params` normalises the level (a model bundle's record).

    The numpy front-ends name ``level_norm`` only when on (their cache keys from before the
    option are unchanged); eGeMAPS always records ``[on, dBFS]`` and was always on before."""
    value = params.get("level_norm")
    if params.get("kind") == "egemaps":
        return True if value is None else bool(value[0])  # type: ignore[index]
    return value is not None


def read_flac(path: Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float64 samples in [-1, 1]; ValueError naming the file if it is unreadable or not mono 16 kHz."""
    import soundfile

    try:
        data, rate = soundfile.read(str(path), dtype="float64", always_2d=True)
    except (RuntimeError, OSError, soundfile.LibsndfileError) as err:
        raise ValueError(f"cannot read audio file {path}: {err}") from err
    if rate != sample_rate:
        raise ValueError(f"{path} is sampled at {rate} Hz; expected {sample_rate} Hz (resample it first)")
    if data.shape[1] != 1:
        raise ValueError(f"{path} has {data.shape[1]} channels; expected mono")
    if data.shape[0] == 0:
        raise ValueError(f"{path} holds no samples")
    return data[:, 0]
