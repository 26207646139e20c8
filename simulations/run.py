"""Hydra entry point: compose ``configs/`` -> validate -> simulate -> result files.

    python -m simulations.run strategy=fedprox privacy.target_epsilon=4 federation.num_clients=20
    python -m simulations.run -m strategy=fedavg,fedprox seed=0,1,2
    fedmer run model=concat

Each run writes rounds.jsonl / rounds.csv / summary.json / model.pt /
learning_curve.png into its Hydra output folder.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from fedmer.config import ConfigError, ExperimentConfig
from fedmer.data.registry import check_partitions
from fedmer.results.layout import SUMMARY_JSON, run_dir
from simulations.compose import CONFIG_DIR, experiment_from_hydra
from simulations.launch import simulate

__all__ = ["CONFIG_DIR", "cli", "experiment_from_hydra", "main", "run"]

log = logging.getLogger("fedmer")


def run(exp: ExperimentConfig) -> dict[str, Any]:
    """Check partitions, run the simulation, return the run's summary (plus ``run_dir``, its folder)."""
    check_partitions(exp)  # fails before Ray starts if a client would be empty
    run_id = simulate(exp)
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
    try:
        exp = experiment_from_hydra(cfg)
        summary = run(exp)
    except ConfigError as err:
        log.error("configuration error: %s", err)
        sys.exit(2)
    except RuntimeError as err:  # a failed run never exits 0 (its files stay for a post-mortem)
        log.error("%s", err)
        sys.exit(1)
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


def cli(argv: list[str]) -> int:
    """``fedmer run [overrides...]`` (registered as the ``run`` entry point of ``fedmer.commands``)."""
    sys.argv = ["fedmer run", *argv]
    main()
    return 0


if __name__ == "__main__":
    main()
