"""The openSMILE eGeMAPS front-end: shape, fixed scaling, level normalisation, config acceptance.

Synthetic signals only (a harmonic tone with noise), so it runs without the shared data; the
RAVDESS gain test is ``test_gain_robustness.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("opensmile")

from fedmer.config import AUDIO_FRONTENDS, DataConfig
from fedmer.data.audio_features import SAMPLE_RATE, build_audio_frontend
from fedmer.data.egemaps import LEVEL_DBFS, N_FUNCTIONALS, N_LLD, EgemapsFrontEnd, normalise_level
from fedmer.training.gain import play_at_gain


def _voice(seconds: float = 1.2, f0: float = 140.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tone = sum(
        np.sin(2 * np.pi * k * f0 * t * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / k for k in range(1, 8)
    )
    envelope = np.clip(np.sin(np.pi * t / seconds), 0, None)
    return 0.05 * envelope * tone + 1e-4 * np.random.default_rng(seed).standard_normal(len(t))


def test_config_accepts_egemaps_and_the_builder_returns_it() -> None:
    assert "egemaps" in AUDIO_FRONTENDS
    assert DataConfig(name="ravdess", audio_frontend="egemaps").audio_frontend == "egemaps"
    fe = build_audio_frontend("egemaps", 7)
    assert isinstance(fe, EgemapsFrontEnd) and fe.kind == "egemaps" and fe.seq_len == 7
    assert build_audio_frontend("mfcc", 7).kind == "mfcc"


def test_shape_names_and_fixed_scaling() -> None:
    fe = EgemapsFrontEnd(seq_len=9)
    x = fe(_voice())
    assert x.shape == (9, N_LLD + N_FUNCTIONALS) == (9, fe.n_features) and x.dtype == np.float32
    assert len(fe.feature_names) == fe.n_features and fe.feature_names[0].startswith("lld_")
    assert np.isfinite(x).all() and np.abs(x).max() < 12  # signed log1p: ~1,000 Hz -> ~7
    functionals = x[:, N_LLD:]
    np.testing.assert_array_equal(functionals, np.repeat(functionals[:1], 9, axis=0))  # clip summary
    assert EgemapsFrontEnd(9, layout="functionals")(_voice()).shape == (9, N_FUNCTIONALS)


def test_silence_and_a_very_short_clip_give_finite_features() -> None:
    fe = EgemapsFrontEnd(seq_len=5)
    for signal in (np.zeros(SAMPLE_RATE), np.zeros(200)):
        x = fe(signal)
        assert x.shape == (5, fe.n_features) and np.isfinite(x).all()


def test_level_normalisation_hides_a_gain_without_clipping() -> None:
    voice = _voice()
    rms = np.sqrt(np.mean(normalise_level(voice) ** 2))
    assert 20 * np.log10(rms) == pytest.approx(LEVEL_DBFS, abs=1e-9)
    fe = EgemapsFrontEnd(seq_len=6)
    quiet, clipped = play_at_gain(voice, -20.0)
    assert not clipped
    np.testing.assert_allclose(fe(quiet), fe(voice), atol=1e-3)
    raw = EgemapsFrontEnd(seq_len=6, level_norm=False)
    assert np.abs(raw(quiet) - raw(voice)).max() > 0.5  # without it the level shows


def test_play_at_gain_clips_at_full_scale() -> None:
    loud, clipped = play_at_gain(np.array([0.0, 0.3, -0.9]), 10.0)
    assert clipped and loud.tolist() == pytest.approx([0.0, 0.3 * 10**0.5, -1.0])
    assert not play_at_gain(np.array([0.3]), -20.0)[1]


def test_params_change_with_every_setting() -> None:
    keys = {
        str(EgemapsFrontEnd(s, n, layout).params())
        for s in (5, 6)
        for n in (True, False)
        for layout in ("lld+functionals", "functionals")
    }
    assert len(keys) == 8
    with pytest.raises(ValueError, match="layout"):
        EgemapsFrontEnd(5, layout="frames")


def test_logmel_level_norm_is_opt_in_and_hides_a_gain() -> None:
    from fedmer.data.audio_features import AudioFrontEnd

    assert "level_norm" not in AudioFrontEnd("logmel", 6).params()  # old cache keys and bundles hold
    fe = AudioFrontEnd("logmel", 6, level_norm=True)
    assert fe.params()["level_norm"] == LEVEL_DBFS
    voice = _voice()
    np.testing.assert_allclose(fe(play_at_gain(voice, -20.0)[0]), fe(voice), atol=1e-4)


@pytest.mark.parametrize("kind", ["logmel", "mfcc", "egemaps"])
@pytest.mark.parametrize("level_norm", [True, False])
def test_a_bundle_s_front_end_record_rebuilds_the_same_front_end(kind: str, level_norm: bool) -> None:
    """``fedmer predict`` rebuilds the front-end from the bundle's record (``level_norm_of``)."""
    from fedmer.data.audio_features import level_norm_of

    fe = build_audio_frontend(kind, 5, level_norm=level_norm)
    assert level_norm_of(fe.params()) is level_norm
    assert build_audio_frontend(kind, 5, level_norm_of(fe.params())).params() == fe.params()


def test_records_from_before_the_option_read_as_what_they_were() -> None:
    """Bundles written before ``data.audio_level_norm``: log-mel without, eGeMAPS with."""
    from fedmer.data.audio_features import level_norm_of

    assert level_norm_of({"kind": "logmel"}) is False
    assert level_norm_of({"kind": "egemaps"}) is True
