"""Compose a Hydra experiment outside ``@hydra.main``: the one way tests and benchmarks build configs.

``python -m simulations.run`` composes ``configs/`` inside Hydra's app; tests and ``bench/``
scripts need the same composition without a Hydra run, and get it here, validated into an
:class:`~fedmer.config.ExperimentConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from fedmer.config import ExperimentConfig

__all__ = ["CONFIG_DIR", "compose_config", "compose_experiment", "experiment_from_hydra"]

#: configs/ beside this package (absolute, so `fedmer run` finds it from any working directory).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def experiment_from_hydra(cfg: DictConfig) -> ExperimentConfig:
    """The validated experiment for a composed Hydra config (unknown keys are an error)."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra", None)
    nested: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    return ExperimentConfig.from_nested(nested)


def compose_config(
    overrides: list[str] | None = None, output_dir: str | Path = "outputs/flwr/{run_id}"
) -> DictConfig:
    """``configs/config.yaml`` composed with ``overrides``, as ``python -m simulations.run`` would.

    Outside ``@hydra.main`` there is no run folder, so ``output.dir`` is set explicitly.
    """
    overrides = [*(overrides or []), f"output.dir='{output_dir}'"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR), job_name="fedmer"):
        return compose(config_name="config", overrides=overrides)


def compose_experiment(
    overrides: list[str] | None = None, output_dir: str | Path = "outputs/flwr/{run_id}"
) -> ExperimentConfig:
    """The validated :class:`ExperimentConfig` of Hydra ``overrides``."""
    return experiment_from_hydra(compose_config(overrides, output_dir))
