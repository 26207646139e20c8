"""The frontier command, shrunk: the real Hydra multirun with its audit callback and report.

The sweep is cut on the command line (the synthetic data, one seed, a tiny federation, the
grids without the fleet axis: 6 epsilons per sample, 6 per client, one no-DP reference = 13
runs) so CI can afford it; the experiment file, union sweeper, joblib launcher (two runs side by
side, each in its own process without Ray), callback, audits and report are the ones the full
frontier uses.
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
    "hydra.sweeper.select=[sample,client,no_dp]",
    "seed=0",
    "federation.num_clients=3",
    "federation.num_rounds=2",
    "data.persons_per_site=2",
    "data.sequences_per_person=20",
]
EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)


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
    assert "frontier: 13 runs" in proc.stderr and "frontier done: 13 runs (0 failed)" in proc.stderr, (
        proc.stderr[-3000:]
    )
    return out


def _runs(sweep: Path) -> dict[tuple[str, float], dict]:
    with open(sweep / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    return {(r["privacy_mode"], float(r["target_epsilon"])): r for r in rows}


def test_one_row_per_grid_point_with_the_units_epsilon(sweep: Path) -> None:
    runs = _runs(sweep)
    expected = {(mode, eps) for mode in ("sample", "client") for eps in EPSILONS} | {("off", math.inf)}
    assert set(runs) == expected  # the no-DP reference once, not once per epsilon
    for eps in EPSILONS[
        :-1
    ]:  # finite targets are met, by Opacus' accountant per sample and Flower's per client
        assert 0.75 * eps < float(runs[("sample", eps)]["unit_epsilon"]) <= eps
        assert 0.75 * eps < float(runs[("client", eps)]["unit_epsilon"]) <= eps
    assert runs[("client", 2.0)]["unit"].startswith("one whole client")
    for mode in ("sample", "client", "off"):  # epsilon inf: the same pipeline with noise 0; off: no DP
        assert float(runs[(mode, math.inf)]["unit_epsilon"]) == math.inf
    for row in runs.values():
        assert row["clients"] == "3" and row["chance_uar"] == "0.2" and 0.0 <= float(row["uar"]) <= 1.0
        assert row["privacy_mode"] == "off" or float(row["delta"]) == 1e-5


def test_every_run_is_audited_and_the_report_states_intervals(sweep: Path) -> None:
    for row in _runs(sweep).values():
        assert float(row["loss_auc_lo"]) <= float(row["loss_auc"]) <= float(row["loss_auc_hi"])
    for name in ("report.md", "runs.csv", "rounds.csv", "uar_vs_epsilon.png", "learning_curves.png"):
        assert (sweep / name).stat().st_size > 0, name
    assert (sweep / "attack_auc_vs_epsilon.png").stat().st_size > 0
    meta = json.loads((sweep / "frontier.json").read_text())
    assert meta["runs"] == 13 and meta["failed"] == 0 and meta["wall_s"] > 0
    report = (sweep / "report.md").read_text()
    assert "| UAR 95% interval | beats chance |" in report and "| leakage vs no DP |" in report
    # one run per cell: no interval over seeds, so no verdict on chance, said as such
    assert "| synthetic driving | client | fedavg | 3 (3) | inf | 1 |" in report
    assert "| – | – (chance 0.200) |" in report
