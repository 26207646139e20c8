"""Ctrl-C stops a run even when the KeyboardInterrupt never reaches FedMER's handler."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from simulations.interrupt import EXIT_INTERRUPTED, FORCE_AFTER_S
from tests.conftest import ROOT

# A process that installs FedMER's handler, then swallows the interrupt (as a library may) and
# would otherwise go on for a minute.
SWALLOWS = """
import subprocess, time
from simulations.interrupt import handle_ctrl_c
handle_ctrl_c()
helper = subprocess.Popen(["sleep", "60"])  # a child it started, as Ray's processes are
print(helper.pid, flush=True)
deadline = time.monotonic() + 60
ready = False
while time.monotonic() < deadline:
    try:
        if not ready:  # inside the try: a Ctrl-C that lands during this print is swallowed too
            ready = True
            print("ready", flush=True)
        time.sleep(0.05)
    except KeyboardInterrupt:
        pass  # swallowed
print("finished", flush=True)
"""


def _start() -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SWALLOWS], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "ready"
    return proc, child


def _running(pid: int, timeout: float = 10.0) -> bool:
    """Whether ``pid`` still runs after ``timeout`` s (a killed child is reaped by init)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state == "Z":
            return False
        time.sleep(0.1)
    return True


def test_a_swallowed_ctrl_c_still_stops_the_process_with_130() -> None:
    proc, child = _start()
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    took = time.monotonic() - started
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert FORCE_AFTER_S - 0.5 <= took < FORCE_AFTER_S + 10
    assert "finished" not in out and "did not stop the run within" in err
    assert not _running(child), "the child process it started is still running"


def test_a_second_ctrl_c_stops_at_once() -> None:
    proc, child = _start()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert time.monotonic() - started < FORCE_AFTER_S - 1
    assert "did not stop the run within" not in err
    assert not _running(child)
