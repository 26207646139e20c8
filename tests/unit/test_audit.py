"""Membership-inference audit: exact ROC statistics, attacks that see overfitting, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmer.cli import main as fedmer_main
from fedmer.config import DataConfig, ExperimentConfig, FederationConfig, ModelConfig, PrivacyConfig
from fedmer.data.base import MultimodalDataset, concat_datasets
from fedmer.data.registry import load_client_dataset, load_split
from fedmer.posthoc.audit.attacks import (
    lira_attack,
    loss_threshold_attack,
    train_like_run,
    train_shadows,
)
from fedmer.posthoc.audit.roc import AttackResult, auc_score, roc_curve, roc_metrics, tpr_at_fpr
from fedmer.privacy.statement import privacy_statement

TINY = ExperimentConfig(
    data=DataConfig(persons_per_site=5, test_persons_per_site=2, sequences_per_person=20, seq_len=8),
    model=ModelConfig(hidden=16),
    privacy=PrivacyConfig(mode="off"),
    federation=FederationConfig(num_clients=2, num_rounds=1, local_epochs=2, batch_size=32),
)
DP = PrivacyConfig(mode="sample", noise_multiplier=1.0)


# -- ROC statistics ----------------------------------------------------------------------
def test_perfect_separation() -> None:
    auc, tpr = roc_metrics(np.arange(200) + 1000.0, np.arange(200.0))
    assert auc == 1.0 and tpr[0.01] == 1.0
    assert tpr[0.001] is None  # 200 non-members cannot resolve 0.1% FPR


def test_identical_distributions_give_chance() -> None:
    rng = np.random.default_rng(0)
    auc, tpr = roc_metrics(rng.normal(size=4000), rng.normal(size=4000))
    assert abs(auc - 0.5) < 0.03
    assert tpr[0.01] < 0.03 and tpr[0.001] is not None


def test_hand_checked_small_cases() -> None:
    # pairs (in, out): 1>0, 1<2, 2=2 (half), 2>0  ->  2.5 / 4
    assert auc_score(np.array([1.0, 2.0]), np.array([2.0, 0.0])) == 0.625
    # 100 non-members 0..99, 1% FPR allows one false positive: threshold above 98
    assert tpr_at_fpr(np.array([99.5, 98.5, 50.0]), np.arange(100.0), 0.01) == pytest.approx(2 / 3)
    assert tpr_at_fpr(np.array([1.0]), np.arange(50.0), 0.01) is None
    fpr, tpr = roc_curve(np.array([3.0, 1.0]), np.array([2.0, 1.0]))
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 0.5, 1.0]


def test_bad_scores_are_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        auc_score(np.array([]), np.array([1.0]))
    with pytest.raises(ValueError, match="non-finite"):
        auc_score(np.array([np.nan]), np.array([1.0]))


scores = st.lists(st.integers(-1000, 1000), min_size=1, max_size=60).map(lambda v: np.array(v, float))


@settings(max_examples=60, deadline=None)
@given(a=scores, b=scores)
def test_auc_is_antisymmetric_and_rank_based(a: np.ndarray, b: np.ndarray) -> None:
    auc = auc_score(a, b)
    assert auc == pytest.approx(1.0 - auc_score(b, a))
    for f in (lambda x: 2 * x + 1, lambda x: x**3, lambda x: np.exp(x / 100)):
        assert auc_score(f(a), f(b)) == pytest.approx(auc)
    fpr, tpr = roc_curve(a, b)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc)


def test_attack_result_json_reports_counts_and_unresolved_rates() -> None:
    r = AttackResult.from_scores("x", np.arange(150.0) + 50, np.arange(150.0))
    j = r.to_json()
    assert j["n_members"] == j["n_nonmembers"] == 150
    assert j["tpr_at_0.1pct_fpr"] is None and "0.1%" in j["note"]
    assert j["auc_ci95"][0] <= j["auc"] <= j["auc_ci95"][1]


# -- attacks on real models ------------------------------------------------------------
def _sample_level_split(n: int) -> tuple[MultimodalDataset, MultimodalDataset]:
    """Members and non-members drawn from the same persons: only membership differs."""
    train = load_split(TINY).train
    order = np.random.default_rng(1).permutation(len(train))
    return train.subset(order[:n]), train.subset(order[n : 2 * n])


@pytest.mark.slow
def test_loss_attack_sees_an_overfit_model_but_not_a_heavily_noised_one() -> None:
    members, nonmembers = _sample_level_split(40)
    overfit = train_like_run(TINY, members, seed=3, noise=0.0, steps=300)
    assert loss_threshold_attack(overfit, members, nonmembers).auc > 0.6

    members, nonmembers = _sample_level_split(100)
    noisy_cfg = replace(TINY, privacy=DP)
    noisy = train_like_run(noisy_cfg, members, seed=3, noise=20.0, steps=300)
    assert loss_threshold_attack(noisy, members, nonmembers).auc < 0.6


@pytest.mark.slow
def test_lira_detects_membership_of_an_overfit_target() -> None:
    members, nonmembers = _sample_level_split(40)
    target = train_like_run(TINY, members, seed=3, noise=0.0, steps=150)
    pool = concat_datasets([members, nonmembers])
    shadow = train_shadows(TINY, pool, shadows=4, noise=0.0, steps=150, seed=0)
    assert shadow.inside.sum(axis=0).tolist() == [2] * len(pool)  # every example in half
    for offline in (False, True):
        result = lira_attack(target, members, nonmembers, shadow, offline=offline)
        assert result.auc > 0.6, result
    with pytest.raises(ValueError, match="concat"):
        lira_attack(target, members, nonmembers.subset(np.arange(5)), shadow)


# -- the run-folder audit and its CLI ---------------------------------------------------
def _run_folder(tmp_path: Path, *, summary: bool = True) -> Path:
    cfg = replace(TINY, privacy=DP)
    run = tmp_path / "run"
    run.mkdir()
    config = {"run_config": cfg.to_run_config(), "privacy": privacy_statement(cfg)}
    (run / "config.json").write_text(json.dumps(config))
    model = train_like_run(cfg, load_client_dataset(cfg, 0), seed=0, noise=1.0, steps=8)
    torch.save(model.state_dict(), run / "model.pt")
    if summary:
        final = {"epsilon_max": 3.5, "delta": 1e-5, "accountant": "rdp", "privacy_unit": "sample"}
        (run / "summary.json").write_text(json.dumps({"final": final}))
    return run


def test_cli_audits_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_folder(tmp_path)
    assert fedmer_main(["audit", str(run), "--shadows", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((run / "audit.json").read_text())
    assert printed == report and (run / "audit_roc.png").stat().st_size > 0
    assert set(report["attacks"]) == {"loss_threshold", "lira_online", "lira_offline"}
    n = min(len(load_client_dataset(TINY, 0)), len(load_split(TINY).test))  # balanced
    for attack in report["attacks"].values():
        assert attack["n_members"] == attack["n_nonmembers"] == n
        assert 0.0 <= attack["auc"] <= 1.0 and attack["tpr_at_0.1pct_fpr"] is None
    assert report["privacy"]["epsilon_max"] == 3.5 and report["privacy"]["delta"] == 1e-5
    assert report["privacy"]["statement"]["accountant"] == "rdp"
    assert report["shadow"]["dp_sgd"] and report["shadow"]["noise_multiplier"] == 1.0

    assert fedmer_main(["audit", str(run), "--shadows", "0"]) == 0
    out = capsys.readouterr().out
    assert "loss_threshold" in out and "lira" not in out and "epsilon 3.500" in out


@pytest.mark.parametrize(
    ("damage", "args", "message"),
    [
        ("nothing", ["--client", "2"], "clients 0..1"),
        ("nothing", ["--shadows", "1"], "shadows=1"),
        ("model.pt", [], "no model.pt"),
        ("config.json", [], "no config.json"),
        ("folder", [], "no run folder"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str, args: list[str], message: str
) -> None:
    run = _run_folder(tmp_path, summary=False)
    if damage == "folder":
        run = tmp_path / "missing"
    elif damage != "nothing":
        (run / damage).unlink()
    assert fedmer_main(["audit", str(run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedmer audit:") and message in err and "\n" not in err


def test_fedmer_command_dispatches_audit(tmp_path, capsys) -> None:
    from fedmer.cli import main

    assert main(["audit", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("fedmer audit:")
