"""The frontier command, shrunk: the real Hydra multirun with its audit callback and report.

The grid is cut on the command line (two units x two epsilons, one strategy, one seed, a tiny
federation) so CI can afford it; the experiment file, callback, audits and report are the
ones the full 216-run frontier uses.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

SHRINK = [
    "data=driving",
    "privacy=sample,client",
    "privacy.target_epsilon=2,inf",
    "strategy=fedavgm",
    "seed=0",
    "federation.num_clients=3",
    "federation.num_rounds=2",
    "data.persons_per_site=2",
    "data.sequences_per_person=20",
    "hydra.callbacks.frontier.shadows=2",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("frontier")
    cmd = [
        sys.executable,
        "-m",
        "simulations.run",
        "-m",
        "+experiment=frontier",
        *SHRINK,
        f"hydra.sweep.dir={out}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "frontier: 4/4 runs (0 failed)" in proc.stderr, proc.stderr[-3000:]
    return out


def _runs(sweep: Path) -> dict[tuple[str, float], dict]:
    with open(sweep / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    return {(r["privacy_mode"], float(r["target_epsilon"])): r for r in rows}


def test_one_row_per_grid_point_with_the_units_epsilon(sweep: Path) -> None:
    runs = _runs(sweep)
    assert set(runs) == {("sample", 2.0), ("sample", math.inf), ("client", 2.0), ("client", math.inf)}
    # finite targets are met, by Opacus' accountant per sample and Flower's per client
    assert 1.5 < float(runs[("sample", 2.0)]["unit_epsilon"]) <= 2.0
    assert 1.5 < float(runs[("client", 2.0)]["unit_epsilon"]) <= 2.0
    assert runs[("client", 2.0)]["unit"].startswith("one whole client")
    for mode in ("sample", "client"):  # epsilon inf: the same pipeline with noise 0
        assert float(runs[(mode, math.inf)]["unit_epsilon"]) == math.inf
    for row in runs.values():
        assert float(row["delta"]) == 1e-5 and 0.0 <= float(row["uar"]) <= 1.0


def test_every_run_is_audited_and_the_report_has_its_figures(sweep: Path) -> None:
    for row in _runs(sweep).values():
        assert 0.0 <= float(row["loss_auc"]) <= 1.0 and 0.0 <= float(row["lira_auc"]) <= 1.0  # seed 0: LiRA
    for name in ("report.md", "runs.csv", "rounds.csv", "uar_vs_epsilon.png", "learning_curves.png"):
        assert (sweep / name).stat().st_size > 0, name
    assert (sweep / "attack_auc_vs_epsilon.png").stat().st_size > 0
    meta = json.loads((sweep / "frontier.json").read_text())
    assert meta["runs"] == 4 and meta["failed"] == 0 and meta["wall_s"] > 0
    assert "| synthetic driving | client | fedavgm | inf |" in (sweep / "report.md").read_text()
