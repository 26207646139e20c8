"""Hydra entry point: compose ``configs/`` -> validate -> simulate -> result files.

    python -m simulations.run strategy=fedprox privacy.target_epsilon=4 federation.num_clients=20
    python -m simulations.run -m strategy=fedavg,fedprox seed=0,1,2
    fedmer run model=concat

Each run writes rounds.jsonl / rounds.csv / summary.json / model.pt /
learning_curve.png into its Hydra output folder, and checkpoint.pt after every round:

    fedmer run <the same overrides> resume=outputs/2025-01-01/12-00-00

continues a killed or interrupted run in its own folder. Ctrl-C stops a run within seconds
(exit 130), stops Ray, and prints that command.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fedmer.config import ConfigError, ExperimentConfig
from fedmer.results.layout import SUMMARY_JSON, run_dir
from simulations.compose import CONFIG_DIR, compose_config, experiment_from_hydra
from simulations.interrupt import EXIT_INTERRUPTED, exit_interrupted, exit_now, handle_ctrl_c, set_run_folder
from simulations.ray_start import start_ray_early, wait_for_ray

# Only light modules above (no torch, Opacus, Flower or Ray): a single run starts Ray in the
# background first (simulations/ray_start.py); the functions below import the rest (seconds).

__all__ = [
    "CONFIG_DIR",
    "Interrupted",
    "JobFailed",
    "cli",
    "experiment_from_hydra",
    "main",
    "run",
]

log = logging.getLogger("fedmer")


class Interrupted(Exception):  # noqa: N818 - names the event, like KeyboardInterrupt
    """Ctrl-C during a run; ``folder`` is its run folder (resumable once a round finished)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(f"run in {folder} interrupted")
        self.folder = folder


def run(exp: ExperimentConfig) -> dict[str, Any]:
    """Check partitions, run the simulation, return the run's summary (plus ``run_dir``, its folder).

    With ``resume=<folder>`` the folder is checked (finished, no checkpoint, another config:
    refused) before Ray starts, and the run continues there.
    """
    from fedmer.data.registry import check_partitions
    from fedmer.results.checkpoint import resumable_checkpoint
    from simulations.launch import new_run_id, simulate

    check_partitions(exp)  # fails before the simulation starts if a client would be empty
    if exp.resume:
        folder = Path(exp.resume).expanduser().resolve()
        ckpt = resumable_checkpoint(folder, exp)
        log.info("resuming %s from its checkpoint after round %d", folder, ckpt.server_round)
        exp = replace(exp, output_dir=str(folder))
    run_id = new_run_id()
    set_run_folder(run_dir(exp.output_dir, run_id))
    try:
        simulate(exp, run_id=run_id)
    except KeyboardInterrupt:
        raise Interrupted(run_dir(exp.output_dir, run_id)) from None
    summary_path = run_dir(exp.output_dir, run_id) / SUMMARY_JSON
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "ok":
        raise RuntimeError(f"the run failed: {summary.get('failure')}; files in {summary_path.parent}")
    return {**summary, "run_dir": str(summary_path.parent)}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one composed config; return the final held-out UAR (for sweepers)."""
    logging.getLogger("flwr").propagate = False  # Flower logs to its own handler; don't print twice
    from simulations.ray_session import keep_ray

    handle_ctrl_c()  # Ctrl-C: exit 130 within seconds, even if a library swallows the interrupt
    if _in_sweep():  # every job of a sweep after the first starts on the same Ray session and actors
        keep_ray()  # jobs with federation.runtime=inprocess never start Ray: nothing to share
    try:
        exp = experiment_from_hydra(cfg)
        summary = run(exp)
    except ConfigError as err:
        _fail_job(f"configuration error: {err}", 2)
    except RuntimeError as err:  # a failed run never exits 0 (its files stay for a post-mortem)
        _fail_job(str(err), 1)
    except Interrupted as stop:
        exit_interrupted(stop.folder)
    final = summary["final"]
    log.info(
        "final held-out UAR %.4f (accuracy %.4f, macro-F1 %.4f); max client epsilon %s at delta %s (%s)",
        final["uar"],
        final["accuracy"],
        final["macro_f1"],
        final["epsilon_max"],
        final["delta"],
        summary["privacy"]["unit"],
    )
    log.info("results: %s", summary["run_dir"])
    return float(final["uar"])


class JobFailed(RuntimeError):  # noqa: N818 - names the event
    """One job of a ``-m`` sweep failed: Hydra runs the other jobs, then reports it and exits 1."""


def _fail_job(message: str, code: int) -> NoReturn:
    """Exit ``code`` in a single run; in a sweep raise instead, so one bad job does not stop the rest.

    Hydra's launcher catches a job's exception and goes on; its sweeper re-raises the first one
    after the last job, so the sweep still ends non-zero. ``sys.exit`` would end the sweep here.
    """
    log.error("%s", message)
    if _in_sweep():
        raise JobFailed(message)
    sys.exit(code)


def _in_sweep() -> bool:
    """True inside a ``-m`` sweep's job (Hydra's basic launcher runs them one after another here)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def cli(argv: list[str]) -> int:
    """``fedmer run [overrides...]`` (registered as the ``run`` entry point of ``fedmer.commands``).

    A single run's config is composed and validated first: any bad input (a bad value, an unknown
    key or group option, a malformed override) is one line on stderr and exit code 2, before Hydra
    makes a run folder. Hydra's own errors would otherwise be several lines and exit code 1.

    A single run on Ray starts Ray in the background as soon as its config composes, so that
    Ray's workers import the ClientApp while this process imports and validates; once the config
    is valid the actors are created (:func:`~simulations.ray_session.prestart`). A config that
    turns out invalid is reported, then Ray's processes are killed by PID as the run leaves.
    """
    sys.argv = ["fedmer run", *argv]
    handle_ctrl_c()  # also while Ray starts early, and where this process was started with Ctrl-C ignored
    composed = _composed(argv)
    if isinstance(composed, ConfigError):
        return _config_error(composed)
    early = (
        composed is not None
        and OmegaConf.select(composed, "federation.runtime") == "ray"
        and start_ray_early()
    )
    try:
        exp = None if composed is None else _experiment(composed)
        if isinstance(exp, ConfigError):
            code = _config_error(exp)
            if early:  # the error is out; Ray's processes are killed by PID (an orderly stop took ~3 s)
                wait_for_ray()
                exit_now(code)
            return code
        if exp is not None and exp.federation.runtime == "ray":
            _prestart_actors(exp)
    except KeyboardInterrupt:  # Ctrl-C before the run's own handler: Ray may be half started
        if early:
            log.error("interrupted before the run started")
            exit_now(EXIT_INTERRUPTED)  # kills Ray's processes by PID, as a run's Ctrl-C does
        raise
    try:
        main()
    except SystemExit as stop:  # a failed run (or sweep) leaves with its status, even past a stuck thread
        _leave(stop.code if isinstance(stop.code, int) else 1)
        raise
    _leave(0)
    return 0


def _config_error(err: ConfigError) -> int:
    print(f"fedmer run: configuration error: {err}", file=sys.stderr)
    return 2


def _prestart_actors(exp: ExperimentConfig) -> None:
    """The run's ClientApp actors, created now: they warm up while this process sets up the run."""
    from client.warm import warm_up
    from simulations.launch import backend_config
    from simulations.ray_session import prestart

    logging.getLogger("flwr").propagate = False  # as main() sets it: Flower logs to its own handler
    prestart(backend_config(exp), functools.partial(warm_up, exp.to_run_config()))


def _leave(code: int) -> None:
    """End the process now with ``code`` if a simulation ran on Ray here, or a thread would block.

    Once the run's files are on disk, Ray's orderly shutdown and the interpreter's teardown
    (torch, Ray's workers) take another ~3 s on this machine; :func:`exit_now` flushes the logs,
    kills this process's Ray processes by PID and leaves. A failed runtime may also have left a
    thread that would keep the interpreter from exiting at all.
    """
    from simulations.launch import ABANDONED

    stuck = [t.name for t in ABANDONED if t.is_alive()]
    if stuck:
        log.error(
            "leaving %d thread(s) of a failed simulation runtime behind (%s)", len(stuck), ", ".join(stuck)
        )
        exit_now(code)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        exit_now(code)


def _composed(argv: list[str]) -> DictConfig | ConfigError | None:
    """A single run's composed config, or what is wrong with its overrides; None for flags (Hydra's own)."""
    if any(arg.startswith("-") for arg in argv):  # -m sweeps, --cfg, --help, -cn, ...: Hydra's own
        return None
    try:
        return compose_config(argv)
    except ConfigError as err:
        return err


def _experiment(composed: DictConfig) -> ExperimentConfig | ConfigError:
    """The validated experiment of a composed config, or what is wrong with it."""
    try:
        return experiment_from_hydra(composed)
    except ConfigError as err:
        return err


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
