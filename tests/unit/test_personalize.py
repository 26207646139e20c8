"""Personalization: only the head moves, the ledger pays exactly what is reported, caps refuse."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmer.data.registry import load_client_dataset
from fedmer.posthoc.personalize.finetune import (
    DPPlan,
    PersonalizeError,
    PersonalizeSettings,
    finetune_head,
    plan_steps,
)
from fedmer.posthoc.personalize.report import personalize_run
from fedmer.privacy.engine import noise_for_target
from fedmer.privacy.ledger import read_ledger
from fedmer.results.reader import load_run, load_run_model
from tests.unit.run_folder import TINY, make_run_folder


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run_folder(tmp_path_factory.mktemp("personalize"))


@pytest.fixture
def run_folder(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy per test: personalization writes into the ledgers."""
    return Path(shutil.copytree(pristine, tmp_path / "run"))


def _plan(n: int, epochs: int = 2, eps: float = 1.0) -> DPPlan:
    p = TINY.privacy
    rate, steps = plan_steps(n, TINY.federation.batch_size, epochs)
    return DPPlan(noise_for_target(eps, p.delta, rate, steps), rate, steps, p.max_grad_norm, "rdp", p.delta)


@pytest.mark.parametrize("dp", [True, False])
def test_only_head_parameters_change(run_folder: Path, dp: bool) -> None:
    model = load_run_model(load_run(run_folder))
    data = load_client_dataset(TINY, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = finetune_head(
        model, data, epochs=2, lr=0.1, batch_size=16, seed=0, dp=_plan(len(data)) if dp else None
    )
    after = tuned.model.state_dict()
    assert set(after) == set(before)  # a plain module again, no Opacus "_module." prefixes
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("fusion.") for k in changed)
    assert tuned.trainable == sum(p.numel() for p in tuned.model.fusion.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # global model untouched


def test_ledger_grows_by_exactly_the_reported_spend(run_folder: Path, capsys: pytest.CaptureFixture) -> None:
    paths = [run_folder / "ledgers" / f"client-{c}.json" for c in range(2)]
    spent_before = [read_ledger(p).spent() for p in paths]
    entries_before = [read_ledger(p).entries for p in paths]
    report = personalize_run(run_folder, PersonalizeSettings(epochs=2, target_epsilon=1.0))
    for c, path in enumerate(paths):
        row, led = report["clients"][c], read_ledger(path)
        assert row["status"] == "personalized" and row["private"]
        assert row["epsilon_before"] == pytest.approx(spent_before[c])
        assert row["epsilon_after"] == pytest.approx(led.spent()) and row["epsilon_after"] > spent_before[c]
        new = led.entries[len(entries_before[c]) :]
        assert led.entries[: len(entries_before[c])] == entries_before[c] and len(new) == 1
        assert (new[0].noise, new[0].rate, new[0].steps) == (
            row["noise_multiplier"],
            row["sample_rate"],
            row["steps"],
        )
        assert row["epsilon_finetune"] <= 1.0 + 0.02  # noise derived for the target
        assert row["delta"] == TINY.privacy.delta and row["accountant"] == "rdp"
        assert 0.0 <= row["personalized_uar"] <= 1.0
    assert report["deployed_uar"]["min"] == min(r["personalized_uar"] for r in report["clients"])
    for ext in ("csv", "json", "png"):
        assert (run_folder / f"personalize.{ext}").stat().st_size > 0
    assert json.loads((run_folder / "personalize.json").read_text()) == report


def test_a_client_over_its_cap_is_refused_and_pays_nothing(run_folder: Path) -> None:
    path = run_folder / "ledgers" / "client-1.json"
    before = read_ledger(path)
    cap = before.spent() + 1e-3
    report = personalize_run(run_folder, PersonalizeSettings(epochs=2, target_epsilon=1.0, cap=cap))
    row = report["clients"][1]
    assert row["status"] == "refused" and "cap" in row["reason"] and row["personalized_uar"] is None
    assert read_ledger(path).entries == before.entries
    assert report["refused"] == [0, 1]  # both clients spent the same, so both are refused
    assert report["deployed_uar"]["min"] == report["global_uar"]["min"]  # refused keep the global model


def test_no_dp_is_labelled_and_leaves_the_ledgers_alone(run_folder: Path) -> None:
    entries = read_ledger(run_folder / "ledgers" / "client-0.json").entries
    report = personalize_run(run_folder, PersonalizeSettings(epochs=1, dp=False))
    assert not report["private"] and "NON-PRIVATE" in report["label"]
    assert all(r["epsilon_after"] is None and not r["private"] for r in report["clients"])
    assert read_ledger(run_folder / "ledgers" / "client-0.json").entries == entries
    assert (run_folder / "personalize_nodp.csv").is_file() and not (run_folder / "personalize.csv").exists()


def test_eval_set_is_the_clients_own_site(run_folder: Path) -> None:
    report = personalize_run(run_folder, PersonalizeSettings(epochs=1, dp=False))
    test = load_run(run_folder).split().test
    for row in report["clients"]:
        site = int(np.unique(load_client_dataset(TINY, row["client"]).site)[0])
        assert f"site {site}" in row["eval_set"] and row["n_eval"] == int((test.site == site).sum())


def test_a_different_delta_is_refused(run_folder: Path) -> None:
    with pytest.raises(PersonalizeError, match="same delta and accountant"):
        personalize_run(run_folder, PersonalizeSettings(delta=1e-6))


def test_bad_settings_and_missing_ledgers(run_folder: Path) -> None:
    with pytest.raises(PersonalizeError, match="target_epsilon=inf"):
        PersonalizeSettings(target_epsilon=math.inf)
    with pytest.raises(PersonalizeError, match="epochs=0"):
        PersonalizeSettings(epochs=0)
    with pytest.raises(PersonalizeError, match="invalid cap"):
        PersonalizeSettings(cap=-1.0)
    (run_folder / "rounds.jsonl").write_text(json.dumps({"round": 1, "client_epsilons": {"0": 2.0}}) + "\n")
    (run_folder / "ledgers" / "client-0.json").unlink()
    with pytest.raises(PersonalizeError, match="no ledger, but client 0 trained"):
        personalize_run(run_folder, PersonalizeSettings(epochs=1))


def test_a_non_private_run_cannot_be_personalized_with_dp(tmp_path: Path) -> None:
    from fedmer.config import PrivacyConfig

    run = make_run_folder(tmp_path, replace(TINY, privacy=PrivacyConfig(mode="off")))
    with pytest.raises(PersonalizeError, match="privacy.mode=off.*--no-dp"):
        personalize_run(run, PersonalizeSettings(epochs=1))


def test_cli(run_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedmer.cli import main

    assert main(["personalize", str(run_folder), "--epochs", "1", "--target-epsilon", "2"]) == 0
    out = capsys.readouterr().out
    assert "worst client" in out and "rdp accountant" in out
    assert main(["personalize", str(run_folder), "--delta", "0.001"]) == 2
    assert "delta=0.001" in capsys.readouterr().err
