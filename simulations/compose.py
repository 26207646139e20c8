"""Compose a Hydra experiment outside ``@hydra.main``: the one way tests and benchmarks build configs.

``python -m simulations.run`` composes ``configs/`` inside Hydra's app; tests and ``bench/``
scripts need the same composition without a Hydra run, and get it here, validated into an
:class:`~fedmer.config.ExperimentConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from fedmer.config import ConfigError, ExperimentConfig, unknown_keys_error

__all__ = ["CONFIG_DIR", "compose_config", "compose_experiment", "composition_error", "experiment_from_hydra"]

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

    Outside ``@hydra.main`` there is no run folder, so ``output.dir`` is set explicitly. Hydra's
    own errors (an unknown key or group option, a malformed override) are raised as one-line
    :class:`ConfigError` messages, like every other bad value.
    """
    given = list(overrides or [])
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR), job_name="fedmer"):
            return compose(config_name="config", overrides=[*given, f"output.dir='{output_dir}'"])
    except (HydraException, ValueError) as err:
        raise composition_error(err, given) from err


def composition_error(err: Exception, overrides: list[str]) -> ConfigError:
    """Hydra's multi-line composition error as one :class:`ConfigError` line naming the override.

    An unknown key (``privacy.target_epsilom=4``) reads like the run config's unknown-key error,
    with the closest valid key; an unknown group option (``strategy=fedsgd``) lists the options.
    """
    cause = err.__cause__
    full_key = getattr(cause, "full_key", None)
    if full_key and "not in struct" in str(cause):
        return unknown_keys_error({full_key: _override_values(overrides).get(full_key, "?")})
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options is not None:
        group, _, option = err.missing_cfg_file.rpartition("/")
        options = [o for o in err.options if not o.startswith("_")]  # _base: a shared fragment
        return ConfigError(
            f"invalid {group}={option!r}: expected one of {', '.join(options)} (configs/{group}/*.yaml)"
        )
    lines = [line.strip() for text in (str(err), str(cause or "")) for line in text.splitlines()]
    message = " ".join(line for line in lines if line and not line.startswith("See https://"))
    if not any(o in message for o in overrides):
        message += f" (overrides: {' '.join(overrides)})"
    return ConfigError(message)


def compose_experiment(
    overrides: list[str] | None = None, output_dir: str | Path = "outputs/flwr/{run_id}"
) -> ExperimentConfig:
    """The validated :class:`ExperimentConfig` of Hydra ``overrides``."""
    return experiment_from_hydra(compose_config(overrides, output_dir))


def _override_values(overrides: list[str]) -> dict[str, Any]:
    """Each override's key and value as Hydra's grammar types it (``4`` -> 4, ``nan`` -> nan)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return {}
    return {o.key_or_group: o.value() for o in parsed}
