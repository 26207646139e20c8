"""A finished run folder, read back: its config, its final global model, its data.

Every post-hoc tool (membership audit, missing-modality evaluation, explanations,
personalization) starts from the same three files the ServerApp wrote (``config.json``,
``model.pt``, optionally ``summary.json``) and rebuilds the run's data split from the
config. Loading lives here once, with one set of error messages, so a folder that is not
a finished FedMER run fails the same way in every tool.

The model comes back as a plain ``nn.Module`` (no Opacus wrapper: ``model.pt`` holds the
state dict without ``_module.`` prefixes), in eval mode.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedmer.config import ConfigError, ExperimentConfig
from fedmer.data.base import DatasetSplit
from fedmer.data.registry import load_split
from fedmer.edge.bundle import BundleError, load_bundle
from fedmer.models import build_model_for
from fedmer.results.layout import BUNDLE, CHECKPOINT, CONFIG_JSON, LEDGER_DIR, SUMMARY_JSON, ledger_file

__all__ = ["RunArtifacts", "RunError", "load_run", "load_run_model"]

log = logging.getLogger(__name__)


class RunError(ValueError):
    """The folder is not a finished FedMER run (or its data cannot be rebuilt); says what is wrong."""


@dataclass(frozen=True)
class RunArtifacts:
    """One finished run: where it is, its validated config, the raw config.json and summary."""

    run_dir: Path
    cfg: ExperimentConfig
    config: dict[str, Any]
    summary: dict[str, Any] | None

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / CHECKPOINT

    def ledger_path(self, client: int, ledger_dir: Path | None = None) -> Path:
        """Client ``client``'s privacy ledger: the simulation default ``<run>/ledgers/client-<i>.json``."""
        return ledger_file(ledger_dir or self.run_dir / LEDGER_DIR, client)

    def split(self) -> DatasetSplit:
        """The run's train pool and held-out test persons, rebuilt from its config (cached)."""
        try:
            return load_split(self.cfg)
        except (ConfigError, OSError) as err:
            raise RunError(f"cannot load the data of run {self.run_dir}: {err}") from None

    def final_privacy(self) -> dict[str, Any]:
        """The last round's privacy figures from summary.json (empty if there is none)."""
        if self.summary is None:
            return {}
        final = self.summary.get("final", {})
        return {
            "epsilon_max": final.get("epsilon_max"),
            "delta": final.get("delta"),
            "accountant": final.get("accountant"),
            "unit": final.get("privacy_unit"),
        }


def load_run(run_dir: str | Path) -> RunArtifacts:
    """Read and validate a run folder; raise :class:`RunError` naming the missing or bad file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"no run folder at {run_dir}")
    config_path = run_dir / CONFIG_JSON
    if not config_path.is_file():
        raise RunError(f"{run_dir} has no {CONFIG_JSON}: is it a FedMER run folder?")
    if not (run_dir / CHECKPOINT).is_file():
        raise RunError(f"{run_dir} has no {CHECKPOINT}: the run did not finish (no final global model)")
    try:
        config = json.loads(config_path.read_text())
        cfg = ExperimentConfig.from_run_config(config["run_config"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise RunError(f"{config_path} is not a FedMER run config ({err!r})") from None
    except ConfigError as err:
        raise RunError(f"{config_path}: {err}") from None
    summary = None
    summary_path = run_dir / SUMMARY_JSON
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as err:
            raise RunError(f"{summary_path} is not valid JSON ({err})") from None
    return RunArtifacts(run_dir, cfg, config, summary)


def load_run_model(run: RunArtifacts) -> nn.Module:
    """The run's final global model as a plain module in eval mode.

    From the run's self-contained bundle when it has one (no data needed); otherwise the
    architecture is rebuilt from the config and the data's layout (runs written before bundles).
    """
    if (run.run_dir / BUNDLE).is_file():
        try:
            return load_bundle(run.run_dir / BUNDLE).model
        except BundleError as err:
            raise RunError(str(err)) from None
    test = run.split().test
    model = build_model_for(run.cfg, test)
    try:
        state = torch.load(run.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise RunError(f"{run.checkpoint} does not fit the run's model config: {err}") from None
    model.eval()
    log.debug("loaded %s (%s/%s)", run.checkpoint, run.cfg.model.encoder, run.cfg.model.fusion)
    return model
