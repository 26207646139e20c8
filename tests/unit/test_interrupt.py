"""Ctrl-C stops a run even when the KeyboardInterrupt never reaches FedMER's handler."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from simulations.interrupt import EXIT_INTERRUPTED, FORCE_AFTER_S
from tests.conftest import ROOT

# A process that installs FedMER's handler, then swallows the interrupt (as a library may) and
# would otherwise go on for a minute.
SWALLOWS = """
import time
from simulations.interrupt import handle_ctrl_c
handle_ctrl_c()
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


def _start() -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", SWALLOWS], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_a_swallowed_ctrl_c_still_stops_the_process_with_130() -> None:
    proc = _start()
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    took = time.monotonic() - started
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert FORCE_AFTER_S - 0.5 <= took < FORCE_AFTER_S + 10
    assert "finished" not in out and "did not stop the run within" in err


def test_a_second_ctrl_c_stops_at_once() -> None:
    proc = _start()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert time.monotonic() - started < FORCE_AFTER_S - 1
    assert "did not stop the run within" not in err
