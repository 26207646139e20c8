"""Empatica E4 export files -> per-frame physiological summaries.

The E4 writes one CSV per sensor: row 1 the start time (unix UTC), row 2 the sample rate
in Hz, then one sample per row (ACC: x, y, z in 1/64 g). Sensors run at different rates
(BVP 64 Hz, ACC 32 Hz, EDA and TEMP 4 Hz, HR 1 Hz) and start at slightly different times,
so every signal is summarised over the same frames in absolute time. Frame statistics
come from prefix sums: any set of frames, one window's or the whole recording's, costs
O(1) per frame, which keeps a from-scratch load of a 60-minute session well under a second.
A file that cannot be parsed raises ``ValueError`` naming the file and line, because a
silently shortened signal would shift every label that follows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["PHYSIO_FEATURES", "SIGNAL_FILES", "Recording", "Signal", "read_recording", "read_tags"]

#: The sensor files a subject folder must hold (IBI is not used: it is derived from BVP).
SIGNAL_FILES: tuple[str, ...] = ("ACC", "BVP", "EDA", "HR", "TEMP")
#: Per-frame feature columns, in the order ``Recording.frame_features`` returns them.
PHYSIO_FEATURES: tuple[str, ...] = (
    "hr_mean",  # beats/min, the E4's own 1 Hz estimate
    "eda_mean",  # skin conductance level, microsiemens
    "eda_std",  # phasic activity within the frame
    "temp_mean",  # skin temperature, Celsius
    "bvp_std",  # pulse amplitude
    "bvp_absdiff",  # mean |first difference| of BVP: pulse steepness and rate
    "acc_mean",  # acceleration magnitude, g
    "acc_std",  # movement
)


@dataclass(frozen=True)
class Signal:
    """One uniformly sampled 1-D signal with prefix sums for O(1) frame statistics."""

    start: float
    rate: float
    values: np.ndarray  # (n,) float64
    _offset: float = field(init=False, repr=False)
    _c1: np.ndarray = field(init=False, repr=False)  # prefix sums of (values - offset)
    _c2: np.ndarray = field(init=False, repr=False)  # ... and of their squares

    def __post_init__(self) -> None:
        offset = float(self.values.mean()) if self.values.size else 0.0
        centred = self.values - offset  # centring keeps the prefix sums of squares exact enough
        object.__setattr__(self, "_offset", offset)
        object.__setattr__(self, "_c1", np.concatenate([[0.0], np.cumsum(centred)]))
        object.__setattr__(self, "_c2", np.concatenate([[0.0], np.cumsum(centred * centred)]))

    @property
    def end(self) -> float:
        return self.start + len(self.values) / self.rate

    def frame_stats(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of the samples in each frame ``[a, b)``; any array shape.

        A frame holding no sample (shorter than the sample period) takes the linearly
        interpolated value at its centre and std 0, so short frames still work for HR.
        """
        n = len(self.values)
        lo = np.clip(np.ceil((a - self.start) * self.rate - 1e-9), 0, n).astype(np.int64)
        hi = np.clip(np.ceil((b - self.start) * self.rate - 1e-9), 0, n).astype(np.int64)
        count = hi - lo
        safe = np.maximum(count, 1)
        c1, c2 = self._c1, self._c2
        mean = (c1[hi] - c1[lo]) / safe
        var = np.maximum((c2[hi] - c2[lo]) / safe - mean * mean, 0.0)
        mean = mean + self._offset
        empty = count == 0
        if empty.any():
            times = self.start + np.arange(n) / self.rate
            mean = np.where(empty, np.interp((a + b) / 2.0, times, self.values), mean)
            var = np.where(empty, 0.0, var)
        return mean, np.sqrt(var)


@dataclass(frozen=True)
class Recording:
    """The signals of one E4 session, already reduced to 1-D (ACC as magnitude in g)."""

    acc: Signal
    bvp: Signal
    bvp_absdiff: Signal
    eda: Signal
    hr: Signal
    temp: Signal

    @property
    def span(self) -> tuple[float, float]:
        """The time range every sensor covers (unix seconds)."""
        signals = (self.acc, self.bvp, self.eda, self.hr, self.temp)
        return max(s.start for s in signals), min(s.end for s in signals)

    def frame_features(self, edges: np.ndarray) -> np.ndarray:
        """``(..., T+1)`` frame edge times -> ``(..., T, len(PHYSIO_FEATURES))`` float64."""
        a, b = edges[..., :-1], edges[..., 1:]
        hr, _ = self.hr.frame_stats(a, b)
        eda_mean, eda_std = self.eda.frame_stats(a, b)
        temp, _ = self.temp.frame_stats(a, b)
        _, bvp_std = self.bvp.frame_stats(a, b)
        bvp_absdiff, _ = self.bvp_absdiff.frame_stats(a, b)
        acc_mean, acc_std = self.acc.frame_stats(a, b)
        return np.stack([hr, eda_mean, eda_std, temp, bvp_std, bvp_absdiff, acc_mean, acc_std], axis=-1)


def _number(path: Path, line_no: int, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path}, line {line_no}: expected a number, got {text.strip()!r}") from None
    if not np.isfinite(value):
        raise ValueError(f"{path}, line {line_no}: non-finite value {text.strip()!r}")
    return value


def _locate_bad_line(path: Path, lines: list[str], columns: int) -> None:
    """Raise naming the first data line that is not ``columns`` finite numbers."""
    for line_no, line in enumerate(lines[2:], start=3):
        parts = line.split(",")
        if len(parts) != columns:
            raise ValueError(
                f"{path}, line {line_no}: expected {columns} comma-separated value(s), got {line!r} "
                "(truncated or corrupt file?)"
            )
        for part in parts:
            _number(path, line_no, part)


def _read_signal(path: Path, columns: int) -> tuple[float, float, np.ndarray]:
    """Start time, rate and ``(n, columns)`` samples of one E4 sensor CSV."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(
            f"{path}: file missing; an E4 subject folder needs {', '.join(SIGNAL_FILES)}"
        ) from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a text CSV ({err})") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 3:
        raise ValueError(
            f"{path}, line {len(lines) + 1}: expected a start-time row, a sample-rate row and data, "
            f"but the file ends after {len(lines)} line(s) (truncated?)"
        )
    start = _number(path, 1, lines[0].split(",")[0])
    rate = _number(path, 2, lines[1].split(",")[0])
    if rate <= 0:
        raise ValueError(f"{path}, line 2: sample rate must be > 0, got {rate}")
    try:
        data = np.array(",".join(lines[2:]).split(","), dtype=np.float64)
    except ValueError:
        _locate_bad_line(path, lines, columns)
        raise
    if data.size != (len(lines) - 2) * columns or not np.isfinite(data).all():
        _locate_bad_line(path, lines, columns)
    return start, rate, data.reshape(-1, columns)


def read_tags(path: Path) -> np.ndarray:
    """Event-mark times (unix seconds) of a ``tags_SXX.csv``, one per row, as written."""
    if not path.is_file():
        raise ValueError(f"{path}: tags file missing")
    lines = path.read_text(encoding="utf-8").splitlines()
    return np.array([_number(path, i, ln) for i, ln in enumerate(lines, start=1) if ln.strip()])


def read_recording(folder: Path) -> Recording:
    """Parse the sensor CSVs of one subject folder."""

    def signal(name: str, values: np.ndarray, start: float, rate: float) -> Signal:
        if values.size < 2:
            raise ValueError(f"{folder / (name + '.csv')}: fewer than 2 samples")
        return Signal(start, rate, np.ascontiguousarray(values, dtype=np.float64))

    start, rate, acc = _read_signal(folder / "ACC.csv", 3)
    acc_sig = signal("ACC", np.sqrt((acc * acc).sum(axis=1)) / 64.0, start, rate)
    start, rate, bvp = _read_signal(folder / "BVP.csv", 1)
    bvp_sig = signal("BVP", bvp[:, 0], start, rate)
    absdiff = Signal(start + 1.0 / rate, rate, np.abs(np.diff(bvp[:, 0])))
    start, rate, eda = _read_signal(folder / "EDA.csv", 1)
    eda_sig = signal("EDA", eda[:, 0], start, rate)
    start, rate, hr = _read_signal(folder / "HR.csv", 1)
    hr_sig = signal("HR", hr[:, 0], start, rate)
    start, rate, temp = _read_signal(folder / "TEMP.csv", 1)
    temp_sig = signal("TEMP", temp[:, 0], start, rate)
    return Recording(acc=acc_sig, bvp=bvp_sig, bvp_absdiff=absdiff, eda=eda_sig, hr=hr_sig, temp=temp_sig)
