"""The sweep report: every finished run becomes a row; groups average over seeds."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from fedmer.config import ExperimentConfig, PrivacyConfig
from fedmer.results.recorder import CSV_COLUMNS, RunRecorder
from fedmer.results.report import write_report


def _run(folder: Path, seed: int, uars: list[float], mode: str = "sample", target: float = 4.0) -> None:
    cfg = ExperimentConfig(seed=seed, privacy=PrivacyConfig(mode=mode, target_epsilon=target))
    rec = RunRecorder(folder, cfg)
    for rnd, uar in enumerate(uars):
        row = dict.fromkeys(CSV_COLUMNS, 0)
        row.update(
            round=rnd,
            uar=uar,
            accuracy=uar,
            macro_f1=uar,
            epsilon_max=math.inf if mode == "off" else rnd,
            delta=None if mode == "off" else 1e-5,
            accountant="none" if mode == "off" else "rdp",
        )
        rec.record(row, {})
    rec.finish({"w": torch.zeros(1)}, {})


def test_report_groups_seeds_and_keeps_epsilon_with_delta(tmp_path: Path) -> None:
    _run(tmp_path / "0", 0, [0.2, 0.5])
    _run(tmp_path / "1", 1, [0.2, 0.7])
    _run(tmp_path / "2", 0, [0.2, 0.9], mode="off")
    (tmp_path / "3").mkdir()  # a job that died before its first round: no files
    report = write_report(tmp_path).read_text()
    # two seeds: a t interval over 1 degree of freedom, cut to [0, 1]; no chance UAR here: no verdict
    assert (
        "| synthetic driving | sample | fedavg | 10 (10) | 4 | 2 | 0.600 ± 0.141 | [0.000, 1.000] | – "
        "| 1 (δ=1e-05, rdp) | – | – | – | – |" in report
    )
    assert "| synthetic driving | off | fedavg | 10 (10) | – | 1 | 0.900 ± 0.000 | – | – | ∞ |" in report
    with open(tmp_path / "runs.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3
    assert (tmp_path / "uar_vs_epsilon.png").stat().st_size > 0


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        write_report(tmp_path)


def test_client_unit_reports_the_client_epsilon_and_audits_feed_the_attack_plot(tmp_path: Path) -> None:
    import json

    cfg = ExperimentConfig(privacy=PrivacyConfig(mode="client", target_epsilon=2.0))
    rec = RunRecorder(tmp_path / "0", cfg)
    for rnd, client_eps in enumerate([0.0, 1.2, 1.9]):
        row = dict.fromkeys(CSV_COLUMNS, 0)
        row.update(round=rnd, uar=0.3, accuracy=0.3, macro_f1=0.3, epsilon_max=math.inf, delta=None)
        row.update(accountant="none", client_epsilon=client_eps)
        rec.record(row, {})
    rec.finish({"w": torch.zeros(1)}, {})
    attacks = {"loss_threshold": {"auc": 0.61, "tpr_at_1pct_fpr": 0.02}, "lira_online": {"auc": 0.66}}
    (tmp_path / "0" / "audit.json").write_text(json.dumps({"attacks": attacks}))
    report = write_report(tmp_path).read_text()
    with open(tmp_path / "runs.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    assert float(row["unit_epsilon"]) == 1.9 and float(row["epsilon"]) == math.inf
    assert row["unit"].startswith("one whole client") and float(row["delta"]) == 1e-5
    assert float(row["loss_auc"]) == 0.61 and float(row["lira_auc"]) == 0.66
    assert (
        "| client | fedavg | 10 (10) | 2 | 1 | 0.300 ± 0.000 | – | – | 1.9 (δ=1e-05, Flower RDP) | 0.610 – "
        "| – | – | 0.660 (1) |" in report
    )
    assert (tmp_path / "attack_auc_vs_epsilon.png").stat().st_size > 0


def test_one_run_per_folder(tmp_path: Path) -> None:
    """A live run's folder is refused, a finished one never overwritten, a dead run's lock taken over."""
    import os

    from fedmer.results.layout import RUN_LOCK
    from fedmer.results.recorder import RunFolderError

    cfg = ExperimentConfig()
    rec = RunRecorder(tmp_path / "a", cfg)
    assert (tmp_path / "a" / RUN_LOCK).read_text() == str(os.getpid())
    with pytest.raises(RunFolderError, match=rf"in use by the run of process {os.getpid()}"):
        RunRecorder(tmp_path / "a", cfg)
    row = dict.fromkeys(CSV_COLUMNS, 0) | {"round": 0}
    rec.record(row, {})
    rec.finish({"w": torch.zeros(1)}, {})
    assert not (tmp_path / "a" / RUN_LOCK).exists()
    with pytest.raises(RunFolderError, match="already holds a finished run"):
        RunRecorder(tmp_path / "a", cfg)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / RUN_LOCK).write_text("999999999")  # a pid no process has
    RunRecorder(tmp_path / "b", cfg)
    assert (tmp_path / "b" / RUN_LOCK).read_text() == str(os.getpid())


def _audited(folder: Path, seed: int, uar: float, mode: str, auc: float, half: float) -> None:
    import json

    _run(folder, seed, [0.2, uar], mode=mode)
    summary = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**summary, "chance_uar": 0.2}))
    attack = {"auc": auc, "auc_ci95": [auc - half, auc + half], "tpr_at_1pct_fpr": None}
    (folder / "audit.json").write_text(json.dumps({"attacks": {"loss_threshold": attack}}))


def test_cells_say_whether_they_beat_chance_and_leak_from_intervals(tmp_path: Path) -> None:
    for seed, (uar, auc) in enumerate([(0.80, 0.70), (0.82, 0.72), (0.79, 0.71)]):  # no DP: leaks
        _audited(tmp_path / f"off{seed}", seed, uar, "off", auc, 0.03)
    for seed, (uar, auc) in enumerate([(0.21, 0.50), (0.26, 0.52), (0.18, 0.49)]):  # DP: neither
        _audited(tmp_path / f"dp{seed}", seed, uar, "sample", auc, 0.05)
    report = write_report(tmp_path).read_text()
    lines = [line for line in report.splitlines() if line.startswith("| synthetic")]
    off, dp = sorted(lines)
    assert "| yes (chance 0.200) |" in off and "| yes | – |" in off  # beats chance; leak; no self-compare
    assert "| no (chance 0.200) |" in dp  # 0.217 ± 0.04 over 3 seeds: its interval reaches chance
    assert "| no | distinguishable |" in dp  # no leak detected, and clearly below the no-DP leakage
