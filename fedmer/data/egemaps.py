"""Speech front-end with openSMILE's eGeMAPSv02 (Eyben et al. 2016): ``data.audio_frontend=egemaps``.

eGeMAPS is the minimalistic, expert-chosen acoustic parameter set of affective speech research:
25 low-level descriptors (LLDs) per 10 ms frame (pitch, loudness, jitter, shimmer, HNR, formants,
spectral balance, 4 MFCCs) and 88 per-clip functionals of them (means, coefficients of variation,
percentiles, slopes, voiced/unvoiced segment rates). It runs offline from the ``opensmile``
wheel (PyPI; the C++ openSMILE library ships inside it); nothing is fetched.

**Layout in the packed ``(N, T, F)`` tensor.** A clip becomes ``(seq_len, 25 + 88)``: the 25
LLDs averaged over ``seq_len`` equal time segments (the sequence, as the numpy front-end pools
its frames), then the 88 functionals repeated on every segment (the clip summary). The
sequence models (TCN, attention) see the contour; ``model=functionals`` takes mean and std over
the segments, so it gets the 88 functionals, the LLD means, and the LLD segment spread. Measured
against the 88 functionals alone (repeated): docs/ravdess.md, "eGeMAPS".

**Fixed scaling.** eGeMAPS values span five orders of magnitude (formant bandwidths ~1,000 Hz,
jitter ~0.01), which a network without standardisation (and DP-SGD, whose federated statistics
are too noisy on RAVDESS to standardise anything) cannot use. Every value goes through the
signed ``log1p``: ``sign(v) log(1 + |v|)``: a fixed per-value rule, monotone, no constants
and no statistics pooled across clips or clients.

**Gain robustness.** Before openSMILE sees it, the waveform is scaled to a fixed RMS of
``LEVEL_DBFS`` (the RAVDESS median; per-utterance level normalisation): a site's microphone
gain then changes nothing but what clipping it causes, at the price of the absolute level
as a cue. The loudness contour relative to the clip's own level stays. ``level_norm=False``
turns it off (the comparison in docs/ravdess.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmer.data.audio_features import LEVEL_DBFS, SAMPLE_RATE, normalise_level, pool_segments

__all__ = ["EGEMAPS_VERSION", "LEVEL_DBFS", "N_FUNCTIONALS", "N_LLD", "EgemapsFrontEnd", "normalise_level"]

N_LLD = 25
N_FUNCTIONALS = 88
#: Bump when anything here changes: the feature caches are keyed by it.
EGEMAPS_VERSION = 1


def _signed_log1p(v: np.ndarray) -> np.ndarray:
    return np.sign(v) * np.log1p(np.abs(v))


@functools.cache
def _smile(level: str) -> Any:
    """One openSMILE extractor per process and feature level (loading its config takes ~0.5 s)."""
    import opensmile

    return opensmile.Smile(
        feature_set=opensmile.FeatureSet.eGeMAPSv02, feature_level=getattr(opensmile.FeatureLevel, level)
    )


@dataclass(frozen=True)
class EgemapsFrontEnd:
    """Clip -> ``(seq_len, 113)`` float32: pooled eGeMAPS LLDs, then the 88 functionals repeated."""

    seq_len: int = 20
    level_norm: bool = True
    layout: str = "lld+functionals"  # or "functionals": the 88 repeated alone (measured, not default)

    def __post_init__(self) -> None:
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"invalid seq_len={self.seq_len}: expected a positive integer")
        if self.layout not in ("lld+functionals", "functionals"):
            raise ValueError(
                f"invalid eGeMAPS layout {self.layout!r}: expected lld+functionals | functionals"
            )

    @property
    def kind(self) -> str:
        return "egemaps"

    @property
    def n_features(self) -> int:
        return N_FUNCTIONALS + (N_LLD if self.layout == "lld+functionals" else 0)

    @property
    def feature_names(self) -> tuple[str, ...]:
        names: list[str] = list(_smile("Functionals").feature_names)
        if self.layout == "lld+functionals":
            names = [f"lld_{n}" for n in _smile("LowLevelDescriptors").feature_names] + names
        return tuple(names)

    def params(self) -> dict[str, object]:
        """Everything the output depends on (for cache keys)."""
        import opensmile

        return {
            "version": EGEMAPS_VERSION,
            "kind": self.kind,
            "opensmile": opensmile.__version__,
            "feature_set": "eGeMAPSv02",
            "seq_len": self.seq_len,
            "layout": self.layout,
            "level_norm": [self.level_norm, LEVEL_DBFS],
            "scaling": "signed_log1p",
        }

    def __call__(self, signal: np.ndarray) -> np.ndarray:
        x = normalise_level(signal) if self.level_norm else np.asarray(signal, dtype=np.float64)
        x32 = x.astype(np.float32).reshape(1, -1)
        func = np.asarray(_smile("Functionals")(x32, SAMPLE_RATE), dtype=np.float64).reshape(-1)
        parts = [np.repeat(func[None, :], self.seq_len, axis=0)]
        if self.layout == "lld+functionals":
            lld = np.asarray(_smile("LowLevelDescriptors")(x32, SAMPLE_RATE), dtype=np.float64)
            lld = lld.reshape(N_LLD, -1).T  # (channels=1, features, frames) -> (frames, features)
            parts.insert(0, pool_segments(lld, self.seq_len))
        out = _signed_log1p(np.concatenate(parts, axis=1))
        return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
