"""Simulated faults and attackers: reproducible choices, exact shares, and what an attacker sends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmer.config import ConfigError, ExperimentConfig, FaultsConfig
from fedmer.federation.faults import _malicious, attackers, fails_this_round, poisoned_labels


def _cfg(**faults: object) -> ExperimentConfig:
    return ExperimentConfig.from_run_config(
        {"federation.num_clients": 10, **{f"faults.{k}": v for k, v in faults.items()}}
    )


@given(rate=st.sampled_from([0.1, 0.2, 0.3, 0.5]), server_round=st.integers(1, 50), seed=st.integers(0, 5))
@settings(max_examples=40, deadline=None)
def test_exactly_the_configured_share_fails_every_round(rate: float, server_round: int, seed: int) -> None:
    cfg = ExperimentConfig.from_run_config(
        {"federation.num_clients": 10, "faults.failure_rate": rate, "seed": seed}
    )
    failing = [pid for pid in range(10) if fails_this_round(cfg, pid, server_round)]
    assert len(failing) == round(rate * 10)
    assert failing == [pid for pid in range(10) if fails_this_round(cfg, pid, server_round)]  # reproducible


def test_failures_move_between_rounds_but_attackers_are_fixed() -> None:
    cfg = _cfg(failure_rate=0.3, attack="sign_flip", attacker_fraction=0.2)
    per_round = {frozenset(p for p in range(10) if fails_this_round(cfg, p, r)) for r in range(1, 11)}
    assert len(per_round) > 1
    assert (
        attackers(cfg.faults, 10, 0) == attackers(cfg.faults, 10, 0)
        and len(attackers(cfg.faults, 10, 0)) == 2
    )


def test_faults_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="faults.attacker_fraction"):
        _cfg(attack="sign_flip")
    with pytest.raises(ConfigError, match="faults.attack="):
        _cfg(attack="backdoor", attacker_fraction=0.2)
    with pytest.raises(ConfigError, match="faults.failure_rate"):
        _cfg(failure_rate=1.5)
    assert not FaultsConfig().active


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g), "n": torch.tensor(7)}


@pytest.mark.parametrize("attack", ["sign_flip", "scale", "noise"])
def test_a_model_attacker_within_bound_sends_an_update_of_norm_c(attack: str) -> None:
    ref, honest = _state(0), _state(1)
    faults = FaultsConfig(attack=attack, attacker_fraction=0.2, attack_scale=10.0)
    sent = _malicious(
        ArrayRecord(honest), ArrayRecord(ref), faults, 0.5, np.random.default_rng(0)
    ).to_torch_state_dict()
    delta = torch.cat([(sent[k] - ref[k]).flatten() for k in ("w", "b")])
    honest_delta = torch.cat([(honest[k] - ref[k]).flatten() for k in ("w", "b")])
    assert float(delta.norm()) == pytest.approx(0.5, rel=1e-5)
    assert int(sent["n"]) == 7  # integer buffers untouched
    cos = float(delta @ honest_delta / (delta.norm() * honest_delta.norm()))
    if attack == "sign_flip":
        assert cos == pytest.approx(-1.0, abs=1e-5)
    if attack == "scale":
        assert cos == pytest.approx(1.0, abs=1e-5)


def test_nan_attack_and_label_flip() -> None:
    ref, honest = _state(0), _state(1)
    faults = FaultsConfig(attack="nan", attacker_fraction=0.2)
    sent = _malicious(
        ArrayRecord(honest), ArrayRecord(ref), faults, 0.5, np.random.default_rng(0)
    ).to_torch_state_dict()
    assert torch.isnan(sent["w"]).all()
    cfg = _cfg(attack="label_flip", attacker_fraction=0.2)
    bad = sorted(attackers(cfg.faults, 10, cfg.seed))
    y = np.array([0, 1, 2, 4])
    assert poisoned_labels(cfg, bad[0], y, 5).tolist() == [4, 3, 2, 0]
    honest_pid = next(p for p in range(10) if p not in bad)
    assert poisoned_labels(cfg, honest_pid, y, 5) is y
