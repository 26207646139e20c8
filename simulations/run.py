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
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from fedmer.config import ConfigError, ExperimentConfig

__all__ = ["experiment_from_hydra", "main", "run"]

log = logging.getLogger("fedmer")

#: configs/ beside this package (absolute, so `fedmer run` finds it from any working directory).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def experiment_from_hydra(cfg: DictConfig) -> ExperimentConfig:
    """The validated experiment for a composed Hydra config (unknown keys are an error)."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra", None)
    nested: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    return ExperimentConfig.from_nested(nested)


def run(exp: ExperimentConfig) -> dict[str, Any]:
    """Check partitions, run the simulation, return the run's summary."""
    from server.app import check_partitions, resolve_output_dir
    from simulations.launch import simulate

    check_partitions(exp)  # fails before Ray starts if a client would be empty
    simulate(exp)
    summary_path = resolve_output_dir(exp, 0) / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    return json.loads(summary_path.read_text())


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
    log.info("results: %s", Path(exp.output_dir).resolve())
    return float(final["uar"])


if __name__ == "__main__":
    main()
