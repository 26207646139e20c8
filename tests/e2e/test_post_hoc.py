"""End to end: a real Flower simulation, then fedmer missing / explain / personalize on its folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmer.privacy.ledger import read_ledger
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def _fedmer(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedmer.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("posthoc")
    cmd = [sys.executable, "-m", "simulations.run", "+experiment=smoke", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_missing_and_explain_on_a_real_run(real_run: Path) -> None:
    proc = _fedmer("missing", str(real_run), "--draws", "2")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((real_run / "missing.json").read_text())
    natural = report["results"][0]
    summary = json.loads((real_run / "summary.json").read_text())
    assert natural["uar"] == pytest.approx(summary["final"]["uar"])  # same model, same test persons
    proc = _fedmer("explain", str(real_run), "--n", "2")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads((real_run / "explain.json").read_text())["samples"]) == 2


def test_personalize_adds_to_the_ledgers_the_rounds_wrote(real_run: Path) -> None:
    ledgers = sorted((real_run / "ledgers").glob("client-*.json"))
    assert len(ledgers) == 3
    before = {p.name: read_ledger(p) for p in ledgers}
    proc = _fedmer("personalize", str(real_run), "--epochs", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for row in report["clients"]:
        led = read_ledger(real_run / "ledgers" / f"client-{row['client']}.json")
        old = before[f"client-{row['client']}.json"]
        assert {e.run_id for e in old.entries} != {"personalize:" + real_run.name}  # rounds' entries
        assert led.entries[: len(old.entries)] == old.entries and len(led.entries) == len(old.entries) + 1
        assert row["epsilon_before"] == pytest.approx(old.spent())
        assert row["epsilon_after"] == pytest.approx(led.spent())
        assert led.spent() > old.spent()
