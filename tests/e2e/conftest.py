"""The e2e tests' quick simulation, run once per session and shared (each start costs Ray ~10 s)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

#: A smoke-sized synthetic federation: 3 clients, 2 rounds, 40 sequences a client.
QUICK = ["federation=quick", "data.persons_per_site=2", "data.sequences_per_person=20"]


def run_cli(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m simulations.run`` with :data:`QUICK` and ``overrides``, writing into ``out``."""
    cmd = [sys.executable, "-m", "simulations.run", *QUICK, *overrides, f"hydra.run.dir={out}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted quick run with seed 7 (the reference the resume tests compare with)."""
    out = tmp_path_factory.mktemp("quick")
    proc = run_cli(out, "seed=7")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out
