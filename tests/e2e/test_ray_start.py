"""A single run starts Ray while it imports and validates (simulations/ray_start.py), and the run
takes over actors that warmed up meanwhile; a bad config still exits 2 with one line, leaving no
Ray process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulations.ray_start import REUSE_ENV
from tests.conftest import ROOT
from tests.e2e.conftest import QUICK

pytestmark = pytest.mark.e2e


def test_the_quick_run_took_over_the_actors_started_early(quick_run: Path) -> None:
    """The shared quick run (tests/e2e/conftest.py) went the early-start path. Its metrics equal,
    round by round, those of ``flwr run`` on Flower's own simulation runtime, which starts Ray
    and its actors itself: tests/e2e/test_flwr_run.py compares the two."""
    log = (quick_run / "run.log").read_text()
    assert "taking over 2 ClientApp actors started before the run" in log
    assert "reusing Ray" not in log and "new pool" not in log


def _session_processes(sid: int) -> list[str]:
    ps = subprocess.run(["ps", "-e", "-o", "sid=,pid=,args="], capture_output=True, text=True, check=True)
    return [line for line in ps.stdout.splitlines() if line.split(None, 1)[0] == str(sid)]


def test_a_bad_value_stops_the_early_ray_exits_2_in_one_line_and_leaves_no_process(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "simulations.run",
        *QUICK,
        "privacy.recipe=bogus",
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, REUSE_ENV: "1"}
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
        deadline = time.monotonic() + 10  # Ray's processes take a moment to go once told to
        while (left := _session_processes(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if proc.poll() is None or _session_processes(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2, err[-3000:]
    assert out == ""
    assert err.strip().splitlines() == [
        "fedmer run: configuration error: invalid privacy.recipe='bogus': expected one of manual, auto"
    ]
    assert left == [], left
    assert not (tmp_path / "rounds.jsonl").exists()
    # Ray did start (its driver log names the process), before the config was found bad
    assert list(Path("/tmp/ray").glob(f"session_*/logs/python-core-driver-*_{proc.pid}.log"))
