"""Start this machine's Ray in the background while the driver imports and validates.

A Ray simulation's start-up is CPU work in three places: the driver's own imports and config
(torch, Opacus, Flower, Hydra: ~5 s on one core), ``ray.init`` (its GCS, raylet and worker
processes) and every ClientApp actor's imports (torch, Opacus, Flower, the ClientApp: ~4 s
each). Run one after the other, as Flower's runtime does, they leave the second core idle.
:func:`start_ray_early` starts Ray first, from a background thread, so that the raylet's
workers import the ClientApp (Ray's ``preload_python_modules``) on the other core while the
driver imports and validates the config; Flower's backend then finds Ray up and the actors
warm (``simulations.ray_session.prestart``).

This module stays light (no torch, no Flower): it runs before the driver's heavy imports.
Only a local Ray is started this way; with ``RAY_ADDRESS`` the runtime attaches to the cluster
as Flower's backend does it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from typing import Any

__all__ = [
    "PRELOAD",
    "REUSE_ENV",
    "ray_init_args",
    "reuse_enabled",
    "start_ray_early",
    "stop_ray",
    "wait_for_ray",
]

log = logging.getLogger(__name__)

#: Environment variable that turns reuse off when set to 0: every run starts its own Ray, as
#: Flower does, after the driver's set-up (no early start, no prestarted actors).
REUSE_ENV = "FEDMER_REUSE_RAY"
#: What every Ray worker of a locally started Ray imports before it accepts an actor.
PRELOAD = ("client.app",)


def reuse_enabled() -> bool:
    """False when ``FEDMER_REUSE_RAY=0``: no shared or early-started Ray in this process."""
    return os.environ.get(REUSE_ENV, "1") != "0"


def ray_init_args() -> dict[str, Any]:
    """``ray.init`` arguments of a simulation: a new local Ray on every core, or ``RAY_ADDRESS``.

    ``include_dashboard``, ``logging_level`` and ``log_to_driver`` are what Flower's runtime
    sets when it is not given them (``DEFAULT_SIMULATION_CONFIG``), stated here so that a Ray
    started early starts the same way.
    """
    logging_args = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
    address = os.environ.get("RAY_ADDRESS")
    if address:  # an existing cluster brings its own resources; ray.init refuses num_cpus then
        return {"address": address, **logging_args}
    # "local": a new Ray instance even when a `ray start` cluster runs on this machine (a bare
    # ray.init() would attach to it, and then refuse num_cpus)
    return {"address": "local", "num_cpus": os.cpu_count() or 2, "num_gpus": 0, **logging_args}


class _Start:
    """The background start: its thread, when it is done, and when the thread may end."""

    thread: threading.Thread | None = None
    done = threading.Event()
    hold = threading.Event()
    failed: BaseException | None = None


def start_ray_early() -> bool:
    """Start a local Ray now, in the background; False (nothing started) where it does not apply.

    Not with ``RAY_ADDRESS`` (the runtime attaches to that cluster), not with reuse off, and not
    when Ray is already up in this process.
    """
    import ray

    if _Start.thread is not None or ray.is_initialized() or not reuse_enabled():
        return False
    init_args = ray_init_args()
    if init_args["address"] != "local":
        return False
    _Start.done.clear()
    _Start.hold.clear()
    _Start.failed = None
    _Start.thread = threading.Thread(target=_start, args=(init_args,), name="fedmer-ray-start", daemon=True)
    _Start.thread.start()
    return True


def _start(init_args: dict[str, Any]) -> None:
    import ray

    _quiet_ray_notes()
    try:
        # Flower's backend hands PYTHONPATH to the workers as a job runtime env; Ray's pre-started
        # workers have none, so none of them could host an actor. Inherited, it reaches them all.
        os.environ["PYTHONPATH"] = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
        ray.init(**init_args, _system_config={"preload_python_modules": list(PRELOAD)})
    except BaseException as err:
        _Start.failed = err
    finally:
        _Start.done.set()
    # Ray starts its GCS and raylet with PR_SET_PDEATHSIG: Linux kills them when the *thread*
    # that started them ends. So this thread lives until stop_ray() or the process exits.
    _Start.hold.wait()


class _NotMainThreadNote(logging.Filter):
    """Drops Ray's note that a ``ray.init`` outside the main thread sets no SIGTERM handler.

    Flower's runtime starts Ray from a thread as well. Without the handler a SIGTERM ends this
    process at once; Linux then stops Ray's GCS and raylet (they die with the thread that
    started them, above), and the workers follow their raylet.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SIGTERM handler is not set")


def _quiet_ray_notes() -> None:
    """Ray's notes that do not apply to a simulation's Ray, kept off a run's console."""
    logging.getLogger("ray._private.worker").addFilter(_NotMainThreadNote())
    # A tip about a future default (with num_gpus=0 Ray empties CUDA_VISIBLE_DEVICES): no change here.
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)


def wait_for_ray() -> None:
    """Return once an early start has finished; a start that failed is logged, not raised
    (Flower's backend then starts Ray itself and reports what fails)."""
    if _Start.thread is None or _Start.thread is threading.current_thread():
        return
    _Start.done.wait()
    if _Start.failed is not None:
        log.warning("starting Ray early failed (%s); the runtime starts it", _Start.failed)
        _Start.failed = None


def stop_ray() -> None:
    """Stop Ray (if up) and let an early start's thread end."""
    import ray

    wait_for_ray()
    if ray.is_initialized():
        ray.shutdown()
    if _Start.thread is not None:
        _Start.hold.set()
        _Start.thread.join()
        _Start.thread = None
