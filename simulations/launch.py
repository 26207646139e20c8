"""Run one FedMER experiment as a Flower simulation inside this process.

This is the engine behind the Hydra entry point and the tests. It drives the very
ServerApp and ClientApp that ``flwr run .`` loads, on Flower's Simulation Runtime
(Ray), with the run config handed over exactly as ``flwr run --run-config`` would.
Flower 1.42 deprecates the public ``run_simulation`` (which cannot take a run
config), so this calls the runtime underneath it; the flwr pin (<1.43) guards that.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType

from fedmer.config import ExperimentConfig
from simulations.flower_patches import flower_patches
from simulations.ray_start import ray_init_args

__all__ = ["ABANDONED", "PROJECT_ROOT", "backend_config", "new_run_id", "simulate"]

log = logging.getLogger(__name__)

#: Threads left running by a runtime that failed to start: Flower's ServerApp thread, already
#: started, waits for replies that no node will send. ``simulations.run`` leaves with
#: :func:`~simulations.interrupt.exit_now` while one is alive, or the process would hang.
ABANDONED: list[threading.Thread] = []

#: Ray cluster addresses this process has announced attaching to (the prestart and the runtime
#: both ask for the backend config; the user is told once).
_ANNOUNCED: set[str] = set()

#: The Flower app directory (holds pyproject.toml with [tool.flwr.app.config]).
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def backend_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """Ray resources set explicitly: all cores for Ray, ``client_cpus`` per ClientApp, no GPU.

    With ``RAY_ADDRESS`` set (``ray start --head`` on one host, ``ray start --address=...`` on
    the others) the simulation attaches to that cluster instead and uses all of its nodes.

    Flower's default gives each client 2 CPUs, which on a 2-core machine runs one client at
    a time; one CPU per client (torch pinned to one thread in the ClientApp) runs two.
    """
    resources = {"num_cpus": cfg.federation.client_cpus, "num_gpus": 0.0}
    init_args = ray_init_args()
    address = init_args["address"]
    if address != "local" and address not in _ANNOUNCED:
        _ANNOUNCED.add(address)
        log.info("attaching the simulation to the Ray cluster at %s (RAY_ADDRESS)", address)
    return {"client_resources": resources, "init_args": init_args}


def new_run_id() -> int:
    """A fresh Flower run id (what fills ``{run_id}`` in ``output.dir``)."""
    return int.from_bytes(secrets.token_bytes(8), "little") >> 1


def simulate(cfg: ExperimentConfig, *, verbose: bool = False, run_id: int | None = None) -> int:
    """Run ``cfg`` to completion; return Flower's run id (results land in ``output.dir`` with it)."""
    # Imported here so that `fedmer` stays importable without the app packages.
    from client.app import app as client_app
    from server.app import app as server_app

    run_config = cfg.to_run_config()
    run_id = new_run_id() if run_id is None else run_id
    run = Run.create_empty(run_id=run_id)
    run.override_config = dict(run_config)
    run.federation_id = NOOP_FEDERATION_ID
    run.primary_task_id = int.from_bytes(secrets.token_bytes(8), "little") >> 1
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(
        run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)
    )
    if cfg.federation.runtime == "inprocess":
        _simulate_in_process(cfg, client_app, run_config, run_id)
        return run_id
    log.info("simulating %d clients on Flower's Ray runtime", cfg.federation.num_clients)
    with flower_patches(), _runtime_failure_named():  # polling and registration that scale; a failed start
        _run_simulation(
            num_supernodes=cfg.federation.num_clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_config=backend_config(cfg),
            server_app_context=context,
            app_dir=str(PROJECT_ROOT),
            run=run,
            is_app=True,  # makes the runtime fuse pyproject defaults with run.override_config
            verbose_logging=verbose,
        )
    return run_id


#: What Flower's ``_main_loop`` raises when its runtime fails (the cause is the ``__cause__``).
_FLOWER_RUNTIME_FAILED = "An error was encountered. Ending simulation."


@contextlib.contextmanager
def _runtime_failure_named() -> Iterator[None]:
    """A runtime that failed to start: record the threads it left running (:data:`ABANDONED`)
    and name the cause, where Flower's own error says only "Ending simulation"."""
    try:
        yield
    except RuntimeError as err:
        if str(err) != _FLOWER_RUNTIME_FAILED:
            raise  # another failure (the ServerApp's own, re-raised by Flower): as it is
        main = threading.main_thread()
        ABANDONED.extend(t for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive())
        cause = err.__cause__
        if cause is None:
            raise
        raise RuntimeError(f"Flower's simulation runtime failed: {type(cause).__name__}: {cause}") from err


def _simulate_in_process(cfg: ExperimentConfig, client_app: ClientApp, run_config: dict, run_id: int) -> None:
    """``federation.runtime=inprocess``: the same ServerApp and ClientApp, no Ray.

    Every ClientApp call runs here, one after another, on :class:`SequentialGrid` (which
    reproduces the Ray runtime's metrics bit for bit, ``tests/e2e/test_simulation.py``). One core
    per run and no start-up: a sweep then runs its jobs side by side (the frontier's joblib
    launcher) instead of each job's clients side by side.
    """
    import torch

    from server.app import run_server
    from simulations.sequential import SequentialGrid

    torch.set_num_threads(1)  # what the ClientApp does on a Ray actor
    log.info(
        "simulating %d clients in this process (federation.runtime=inprocess)", cfg.federation.num_clients
    )
    grid = SequentialGrid(client_app, cfg.federation.num_clients, run_config, run_id=run_id)
    run_server(grid, cfg, run_id)
