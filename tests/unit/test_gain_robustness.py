"""A site's microphone gain must not decide the emotion (RAVDESS, held-out actors).

A small centralised model (the per-clip functionals network, pooled training clips of the
speech-only 360-clip experiment) is trained on the clips as recorded; the 90 held-out clips
are then replayed at -20 dB and +10 dB (waveform scaled before the front-end, clipped at +-1)
through RAVDESS' default front-end. Needs ``../shared/data/ravdess``; the first run builds the
feature cache, then about a minute (openSMILE on 180 replayed clips).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedmer.data.audio_features import SAMPLE_RATE
from fedmer.data.ravdess import default_cache_dir, load_actor_speech
from fedmer.training.gain import gain_robustness, play_at_gain
from simulations.compose import compose_experiment
from tests.conftest import SHARED_DATA

DATA = SHARED_DATA / "ravdess"
pytestmark = [
    pytest.mark.data,
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA / "audio16k").is_dir(), reason="../shared/data/ravdess not found"),
]

OVERRIDES = [
    "+experiment=ravdess_audio",
    "data.complete_only=true",
    "model=functionals",
    "data.standardize=federated",
]


def test_predictions_survive_minus_20_and_plus_10_db() -> None:
    cfg = compose_experiment(OVERRIDES)
    result = gain_robustness(cfg, gains_db=(-20.0, 10.0))
    uar, agree = result["uar"], result["agreement"]
    assert isinstance(uar, dict) and isinstance(agree, dict) and result["n_test"] == 90
    assert uar[0.0] > 0.25  # it learned something (chance 0.125), else agreement means little
    for gain in (-20.0, 10.0):
        assert agree[gain] >= 0.95, (gain, result)
        assert abs(uar[gain] - uar[0.0]) <= 0.03, (gain, result)


def test_content_hashed_cache_notices_a_same_size_same_mtime_edit(tmp_path) -> None:
    """The speech cache key hashes the FLAC bytes: an edit keeping size and mtime is a new key."""
    import os
    import shutil

    from fedmer.data.audio_features import AudioFrontEnd

    folder = tmp_path / "Actor_03"
    shutil.copytree(DATA / "audio16k" / "Actor_03", folder)
    fe, cache = AudioFrontEnd("mfcc", 3), tmp_path / "cache"
    first = load_actor_speech(folder, fe, cache)
    victim = sorted(folder.glob("*.flac"))[0]
    stat = victim.stat()
    raw = bytearray(victim.read_bytes())
    raw[26 + 8] ^= 0xFF  # a byte of STREAMINFO's MD5 signature: same size, same samples
    victim.write_bytes(bytes(raw))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert victim.stat().st_size == stat.st_size and victim.stat().st_mtime_ns == stat.st_mtime_ns
    again = load_actor_speech(folder, fe, cache)
    assert len(list(cache.glob("*.npz"))) == 2  # recomputed under a new key, not read back
    np.testing.assert_array_equal(again, first)
    assert default_cache_dir().name == "ravdess"
    assert play_at_gain(np.zeros(SAMPLE_RATE), 10.0)[1] is False
