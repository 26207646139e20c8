"""The run record: per-round results as JSON lines and CSV, a summary, and a checkpoint.

Every round is appended and flushed as it finishes, so a run that dies at round 7
still leaves rounds 0-6 on disk. Every epsilon is written next to its delta, its
accountant and the unit it protects, never alone.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedmer.config import ExperimentConfig
from fedmer.privacy.client_level import client_noise_multiplier

__all__ = ["CSV_COLUMNS", "ROUNDS_JSONL", "RunRecorder", "privacy_statement", "read_rounds"]

log = logging.getLogger(__name__)

ROUNDS_JSONL = "rounds.jsonl"
ROUNDS_CSV = "rounds.csv"
SUMMARY_JSON = "summary.json"
CONFIG_JSON = "config.json"
CHECKPOINT = "model.pt"

CSV_COLUMNS = (
    "round",
    "accuracy",
    "macro_f1",
    "uar",
    "loss",
    "intensity_uar",  # empty without an intensity head (model.intensity_weight = 0)
    "intensity_accuracy",
    "epsilon_max",
    "epsilon_mean",
    "delta",
    "accountant",
    "privacy_unit",
    "clients_sampled",
    "clients_replied",
    "clients_failed",
    "clients_refused",
    "client_epsilon",
    "train_loss",
    "update_norm_mean",
    "update_clipped_frac",
    "elapsed_s",
)


def privacy_statement(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the reported epsilon means for this run."""
    p = cfg.privacy
    statement: dict[str, Any] = {"mode": p.mode}
    if p.client_level:
        accounted = p.client_clipping == "fixed"
        statement["client_level"] = {
            "unit": "one whole client (a vehicle or hospital with all its data, add/remove)",
            "accountant": "Flower RDP (dp-accounting), no sampling amplification" if accounted else "none",
            "delta": p.delta if accounted else None,
            "noise_multiplier": client_noise_multiplier(cfg),
            "target_epsilon": p.target_epsilon if p.client_noise_multiplier is None else None,
            "clipping": f"{p.client_clipping}, {p.client_clipping_side}-side, norm {p.update_clip_norm}",
            "note": "client_epsilon in rounds.csv" if accounted else "adaptive clipping is not accounted",
        }
    if not p.sample_level:
        statement.update(
            unit="none",
            accountant="none",
            delta=None,
            note="no DP-SGD inside clients: sample-level epsilon is infinite",
        )
        return statement
    return {
        **statement,
        "unit": "sample (one training sequence of one person, add/remove) within each client",
        "accountant": p.accountant,
        "delta": p.delta,
        "target_epsilon": p.target_epsilon if p.noise_multiplier is None else None,
        "noise_multiplier": p.noise_multiplier if p.noise_multiplier is not None else "derived from target",
        "per_sample_clip": p.max_grad_norm,
        "update_clip_norm": p.update_clip_norm,
        "note": "epsilon is cumulative over every round the client trained in; "
        "max over clients is the figure to quote",
    }


def _clean(value: Any) -> Any:
    """JSON has no infinity: write it as the string 'inf' (NaN as None)."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@dataclass
class RunRecorder:
    """Writes one run's files into ``out_dir`` as the run goes."""

    out_dir: Path
    cfg: ExperimentConfig
    rows: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name in (ROUNDS_JSONL, ROUNDS_CSV):
            (self.out_dir / name).unlink(missing_ok=True)
        config = {"run_config": self.cfg.to_run_config(), "privacy": privacy_statement(self.cfg)}
        (self.out_dir / CONFIG_JSON).write_text(json.dumps(_clean(config), indent=2))
        with open(self.out_dir / ROUNDS_CSV, "w", newline="") as fh:
            csv.writer(fh).writerow(CSV_COLUMNS)

    def record(self, row: dict[str, Any], detail: dict[str, Any]) -> None:
        """Append one round: ``row`` has the CSV columns, ``detail`` the rest (per class, per client)."""
        missing = set(CSV_COLUMNS) - set(row)
        if missing:
            raise KeyError(f"round row lacks columns {sorted(missing)}")
        self.rows.append(row)
        with open(self.out_dir / ROUNDS_JSONL, "a") as fh:
            fh.write(json.dumps(_clean({**row, **detail})) + "\n")
        with open(self.out_dir / ROUNDS_CSV, "a", newline="") as fh:
            csv.writer(fh).writerow([_clean(row[c]) for c in CSV_COLUMNS])

    def finish(self, state_dict: dict[str, torch.Tensor], extra: dict[str, Any]) -> dict[str, Any]:
        """Write the checkpoint and summary; return the summary."""
        torch.save(state_dict, self.out_dir / CHECKPOINT)
        final = self.rows[-1] if self.rows else {}
        summary = {
            "final": final,
            "best_uar": max((r["uar"] for r in self.rows), default=None),
            "rounds": len(self.rows) - 1,
            "privacy": privacy_statement(self.cfg),
            "files": {
                "rounds_csv": ROUNDS_CSV,
                "rounds_jsonl": ROUNDS_JSONL,
                "checkpoint": CHECKPOINT,
                "learning_curve": "learning_curve.png",
            },
            **extra,
        }
        (self.out_dir / SUMMARY_JSON).write_text(json.dumps(_clean(summary), indent=2))
        return summary


def read_rounds(out_dir: str | Path) -> list[dict[str, Any]]:
    """The per-round records of a finished (or interrupted) run."""
    path = Path(out_dir) / ROUNDS_JSONL
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
