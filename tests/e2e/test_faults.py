"""Simulated faults and attackers in a real Flower simulation: counted, survived, or failing loudly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedmer.config import ExperimentConfig
from fedmer.federation.faults import attackers, fails_this_round
from tests.conftest import ROOT
from tests.e2e.conftest import QUICK, run_cli

pytestmark = pytest.mark.e2e

TEN = ("federation.num_clients=10", "federation.fraction_evaluate=0", "seed=4")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def test_30_percent_crashing_and_nan_attackers_every_one_counted_no_round_lost(tmp_path: Path) -> None:
    proc = run_cli(
        tmp_path, *TEN, "faults.failure_rate=0.3", "faults.attack=nan", "faults.attacker_fraction=0.2"
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    cfg = ExperimentConfig.from_run_config(
        {"federation.num_clients": 10, "seed": 4, "faults.failure_rate": 0.3, "faults.attack": "nan",
         "faults.attacker_fraction": 0.2}
    )  # fmt: skip
    bad = attackers(cfg.faults, 10, 4)
    rows = _rows(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]  # no round lost
    for r in rows[1:]:
        failing = {p for p in range(10) if fails_this_round(cfg, p, r["round"])}
        assert r["clients_failed"] == 3 == len(failing)
        assert r["clients_rejected"] == len(bad - failing)  # NaN updates never reach the model
        assert all("simulated" in f for f in r["failures"]) and all(
            "non-finite" in x for x in r["rejections"]
        )
        assert r["clients_replied"] == 10 - 3 - len(bad - failing)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["clients_failed_total"] == 6
    assert summary["final"]["uar"] > 0  # a finite model came out


def test_a_run_where_most_trainings_fail_exits_non_zero(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, *TEN, "faults.failure_rate=0.6")
    assert proc.returncode == 1, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "12 of 20 sampled trainings failed" in summary["failure"]


#: Runs simulations.run with Flower's runtime made to fail as it starts (it raises while
#: registering the nodes, as it did on a run-config key missing from pyproject.toml).
_BROKEN_RUNTIME = """
import sys
from flwr.server.superlink.fleet.vce import vce_api

def broken(*args, **kwargs):
    raise ValueError("injected: the runtime cannot register its nodes")

vce_api._register_node_info_stores = broken
from simulations.run import cli

sys.exit(cli(sys.argv[1:]))
"""


def test_a_runtime_that_fails_to_start_exits_1_at_once_naming_the_cause(tmp_path: Path) -> None:
    """The ServerApp thread, already started and waiting for replies, must not hold the process
    (it did: the run hung after Flower logged "Ending simulation")."""
    cmd = [sys.executable, "-c", _BROKEN_RUNTIME, *QUICK, f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # hung: stop it and everything it started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 1, err[-4000:]
    assert "Flower's simulation runtime failed: ValueError: injected" in out + err
    assert not (tmp_path / "summary.json").exists()
