"""Ctrl-C during a simulation: stop within seconds, stop Ray, say how to resume, exit 130.

The first Ctrl-C raises KeyboardInterrupt in the main thread, as Python's own handler does;
``simulations.run`` turns it into :func:`exit_interrupted`. That path can fail: a library on
the way may catch the interrupt (a ``DeferSigint`` window of Ray's, a broad ``except``), or the
main thread may sit in a C-level wait that a signal taken by another thread does not wake (it
was seen once on a loaded machine: the run ignored Ctrl-C and finished its rounds). So the
handler also arms a watchdog: if the process is still running ``FORCE_AFTER_S`` seconds after
the first Ctrl-C, the watchdog thread stops it the same way. A second Ctrl-C stops it at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import NoReturn

from fedmer.results.layout import RESUME_CHECKPOINT

__all__ = [
    "EXIT_INTERRUPTED",
    "FORCE_AFTER_S",
    "exit_interrupted",
    "exit_now",
    "handle_ctrl_c",
    "set_run_folder",
]

log = logging.getLogger("fedmer")

#: Exit status of a run stopped by Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130
#: Seconds after the first Ctrl-C before the watchdog stops the run itself.
FORCE_AFTER_S = 5.0


class _State:
    folder: Path | None = None
    pressed = False
    lock = threading.Lock()


def set_run_folder(folder: Path) -> None:
    """The folder of the run in progress (where the resume hint points)."""
    _State.folder = folder


def handle_ctrl_c() -> None:
    """Install the Ctrl-C handler (main thread only; elsewhere Python refuses signal handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    if _State.pressed:  # the second Ctrl-C
        exit_interrupted(_State.folder)
    _State.pressed = True
    watchdog = threading.Timer(FORCE_AFTER_S, _force)
    watchdog.daemon = True
    watchdog.start()
    raise KeyboardInterrupt


def _force() -> None:
    log.error("Ctrl-C did not stop the run within %.0f s: stopping it now", FORCE_AFTER_S)
    exit_interrupted(_State.folder)


def _descendants() -> list[int]:
    """PIDs of every process below this one (Ray's GCS, raylet, workers), read from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:  # the parent PID is the 4th field after the ")" that closes the command name
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or not ours to read
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [os.getpid()]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _stop_children() -> None:
    """Kill the processes this run started, by PID, without calling into Ray.

    ``ray.shutdown()`` is not safe here: Flower's backend thread is still calling Ray, and Ray's
    core worker ends the whole process with status 1 when it is used after a shutdown (seen in CI:
    "The core worker has already been shutdown ... The process will exit").
    """
    if not Path("/proc").is_dir():  # not Linux: no process table to read; ask Ray instead
        import ray

        ray.shutdown()
        return
    for pid in _descendants():
        with contextlib.suppress(OSError):  # already gone
            os.kill(pid, signal.SIGKILL)  # the checkpoint is on disk already; Ray holds nothing else


def exit_interrupted(folder: Path | None) -> NoReturn:
    """Say how to resume, stop Ray's processes and leave now: the ServerApp thread may be mid-round.

    Safe from any thread, once: a second caller waits for the first to end the process.
    """
    with _State.lock:
        if folder is not None and (folder / RESUME_CHECKPOINT).exists():
            args = [a for a in sys.argv[1:] if not a.startswith(("resume=", "hydra.run.dir="))]
            log.error("interrupted; to resume: fedmer run %s resume=%s", " ".join(args), folder)
        else:
            log.error("interrupted before the first round finished; nothing to resume in %s", folder)
        exit_now(EXIT_INTERRUPTED)


def exit_now(code: int) -> NoReturn:
    """Flush the logs, kill this process's children by PID and leave with ``code`` at once.

    Not ``sys.exit``: a non-daemon thread still running (Flower's ServerApp thread, mid-round or
    waiting for replies no node will send) would keep the interpreter from exiting.
    """
    logging.shutdown()
    try:
        _stop_children()
    except Exception as err:  # never let a failed cleanup change the exit status
        sys.stderr.write(f"could not stop the run's child processes: {err}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
