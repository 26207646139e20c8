"""A site's microphone gain must not decide the emotion (RAVDESS, held-out actors).

A small centralised model (the per-clip functionals network, pooled training clips of the
speech-only 360-clip experiment) is trained on the clips as recorded; the 90 held-out clips
are then replayed at -20 dB and +10 dB (waveform scaled before the front-end, clipped at +-1)
through each speech front-end as configured by default (``data.audio_level_norm=true``: each
clip scaled to a fixed RMS first). Needs ``../shared/data/ravdess``; the first run builds the
feature cache, then about a minute each (180 replayed clips).
"""

from __future__ import annotations

import pytest

from fedmer.training.gain import gain_robustness
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


@pytest.mark.parametrize("frontend", ["logmel", "egemaps"])
def test_predictions_survive_minus_20_and_plus_10_db(frontend: str) -> None:
    cfg = compose_experiment([*OVERRIDES, f"data.audio_frontend={frontend}"])
    result = gain_robustness(cfg, gains_db=(-20.0, 10.0))
    uar, agree = result["uar"], result["agreement"]
    assert isinstance(uar, dict) and isinstance(agree, dict) and result["n_test"] == 90
    assert uar[0.0] > 0.25  # it learned something (chance 0.125), else agreement means little
    for gain in (-20.0, 10.0):
        assert agree[gain] >= 0.95, (gain, result)
        assert abs(uar[gain] - uar[0.0]) <= 0.03, (gain, result)


def test_without_level_normalisation_the_gain_decides_the_prediction() -> None:
    """The same check must fail when the front-end reads the absolute level (what it guards)."""
    cfg = compose_experiment([*OVERRIDES, "data.audio_frontend=logmel", "data.audio_level_norm=false"])
    agree = gain_robustness(cfg, gains_db=(-20.0,))["agreement"]
    assert isinstance(agree, dict) and agree[-20.0] < 0.9
