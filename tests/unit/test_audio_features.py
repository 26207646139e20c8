"""Properties of the numpy speech front-end (no data files needed)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmer.data.audio_features import (
    HOP,
    N_FFT,
    SAMPLE_RATE,
    WINDOW,
    AudioFrontEnd,
    dct_ii,
    deltas,
    frame_power,
    hz_to_mel,
    log_mel,
    mel_filterbank,
    mel_to_hz,
    mfcc,
    pitch,
    pool_segments,
    read_flac,
)

FAST = settings(max_examples=25, deadline=None)


def _tone(freq: float, seconds: float = 0.5, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return amp * np.sin(2 * np.pi * freq * t)


@FAST
@given(st.integers(min_value=8, max_value=60), st.floats(min_value=0.0, max_value=300.0))
def test_filterbank_nonnegative_and_covers_the_band(n_mels: int, fmin: float) -> None:
    fb = mel_filterbank(n_mels, fmin=fmin)
    assert fb.shape == (n_mels, N_FFT // 2 + 1)
    assert (fb >= 0).all() and (fb <= 1).all()
    assert (fb.max(axis=1) > 0).all()  # no empty band
    bins = np.arange(N_FFT // 2 + 1) * SAMPLE_RATE / N_FFT
    inside = (bins > fmin) & (bins < SAMPLE_RATE / 2)
    assert (fb[:, inside].sum(axis=0) > 0).all()  # every bin in (fmin, Nyquist) is heard
    # Triangles overlap so that adjacent bands sum to 1 between the first and last centre.
    centres = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))[1:-1]
    between = (bins >= centres[0]) & (bins <= centres[-1])
    np.testing.assert_allclose(fb[:, between].sum(axis=0), 1.0, atol=1e-9)


def test_too_many_mels_is_an_error() -> None:
    with pytest.raises(ValueError, match="too many"):
        mel_filterbank(200)


@FAST
@given(st.floats(min_value=1.0, max_value=7900.0))
def test_mel_scale_roundtrip_and_htk_anchor(f: float) -> None:
    assert mel_to_hz(hz_to_mel(f)) == pytest.approx(f, rel=1e-9)
    assert hz_to_mel(1000.0) == pytest.approx(1000.0, abs=0.1)  # HTK: 1 kHz ~ 1000 mel


@FAST
@given(st.integers(min_value=3, max_value=37))
def test_tone_peaks_in_its_mel_band(band: int) -> None:
    centres = mel_to_hz(np.linspace(0.0, hz_to_mel(SAMPLE_RATE / 2), 40 + 2))[1:-1]
    frames = log_mel(_tone(float(centres[band])))
    assert (frames.argmax(axis=1)[2:-2] == band).all()


def test_full_scale_sine_is_near_0_dbfs() -> None:
    power = frame_power(_tone(1000.0, amp=1.0))[3]
    assert power.max() == pytest.approx(1.0, rel=0.05)


@FAST
@given(st.integers(min_value=0, max_value=2**31 - 1), st.floats(min_value=0.05, max_value=1.0))
def test_gain_shifts_only_c0(seed: int, gain: float) -> None:
    noise = np.random.default_rng(seed).uniform(-0.5, 0.5, 4000)
    a, b = mfcc(noise), mfcc(gain * noise)
    shift = 20 * np.log10(gain) / 20.0 * np.sqrt(40)  # dB / scale, spread over c0 by the orthonormal DCT
    np.testing.assert_allclose(b[:, 0] - a[:, 0], shift, atol=1e-6)
    np.testing.assert_allclose(b[:, 1:], a[:, 1:], atol=1e-6)


def test_dct_is_orthonormal() -> None:
    basis = dct_ii(np.eye(40), 40)
    np.testing.assert_allclose(basis @ basis.T, np.eye(40), atol=1e-12)


@FAST
@given(st.integers(min_value=1, max_value=30_000), st.sampled_from(["logmel", "mfcc"]), st.integers(4, 40))
def test_any_length_gives_the_fixed_shape(length: int, kind: str, seq_len: int) -> None:
    fe = AudioFrontEnd(kind, seq_len)
    out = fe(np.random.default_rng(length).normal(0, 0.1, length))
    assert out.shape == (seq_len, fe.n_features) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert len(fe.feature_names) == fe.n_features


def test_frame_count_covers_every_sample() -> None:
    for n in (1, WINDOW, WINDOW + 1, WINDOW + HOP, 16_000):
        frames = frame_power(np.ones(n))
        assert len(frames) == 1 + max(0, -(-(n - WINDOW) // HOP))
        assert (len(frames) - 1) * HOP + WINDOW >= n


@pytest.mark.parametrize("kind", ["logmel", "mfcc"])
def test_silence_is_finite_and_at_the_floor(kind: str) -> None:
    out = AudioFrontEnd(kind, 10)(np.zeros(16_000))
    assert np.isfinite(out).all()
    if kind == "logmel":
        np.testing.assert_allclose(out[:, :40], -1.0)  # (-100 dBFS + 80) / 20
    assert not out[:, -4:].any()  # no pitch, no voicing, no change


@FAST
@given(st.floats(min_value=90.0, max_value=400.0))
def test_pitch_of_a_harmonic_tone(f0: float) -> None:
    t = np.arange(8000) / SAMPLE_RATE
    voice = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6)) * 0.2
    log_f0, voicing = pitch(voice)[3:-3].T
    assert (voicing > 0.8).all()
    np.testing.assert_allclose(2.0 ** np.median(log_f0) * 100.0, f0, rtol=0.03)


def test_pitch_of_noise_is_mostly_unvoiced() -> None:
    noise = np.random.default_rng(0).normal(0, 0.1, 16_000)
    assert (pitch(noise)[:, 1] < 0.5).mean() > 0.9


@FAST
@given(st.integers(min_value=1, max_value=300), st.integers(min_value=1, max_value=50))
def test_pooling_means_equal_segments(n: int, seq_len: int) -> None:
    frames = np.random.default_rng(n).normal(size=(n, 3))
    pooled = pool_segments(frames, seq_len)
    assert pooled.shape == (seq_len, 3)
    if n % seq_len == 0:
        np.testing.assert_allclose(pooled, frames.reshape(seq_len, n // seq_len, 3).mean(axis=1))
    assert pooled.min() >= frames.min() - 1e-9 and pooled.max() <= frames.max() + 1e-9


def test_deltas_of_a_ramp_are_its_slope() -> None:
    ramp = np.arange(20, dtype=float)[:, None] * np.array([[1.0, -2.0]])
    np.testing.assert_allclose(deltas(ramp)[2:-2], [[1.0, -2.0]] * 16)


def test_trimming_drops_leading_and_trailing_silence() -> None:
    clip = np.concatenate([np.zeros(8000), _tone(300.0, 0.5), np.zeros(8000)])
    fe = AudioFrontEnd("logmel", 10)
    assert len(fe.frames(clip)) == pytest.approx(len(_tone(300.0, 0.5)) / HOP, abs=4)


def test_bad_front_end_name() -> None:
    with pytest.raises(ValueError, match="logmel"):
        AudioFrontEnd("spectrogram")


def test_read_flac_errors_name_the_file(tmp_path) -> None:
    import soundfile

    garbage = tmp_path / "bad.flac"
    garbage.write_bytes(b"not a flac file at all")
    with pytest.raises(ValueError, match="bad.flac"):
        read_flac(garbage)
    wrong_rate = tmp_path / "rate.flac"
    soundfile.write(wrong_rate, np.zeros(800), 8000)
    with pytest.raises(ValueError, match="8000 Hz"):
        read_flac(wrong_rate)
    good = tmp_path / "good.flac"
    soundfile.write(good, _tone(440.0), SAMPLE_RATE, subtype="PCM_16")
    np.testing.assert_allclose(read_flac(good), _tone(440.0), atol=1e-4)
