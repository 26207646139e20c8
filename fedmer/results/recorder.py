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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedmer.config import ExperimentConfig
from fedmer.edge.bundle import write_run_bundle
from fedmer.privacy.statement import privacy_statement
from fedmer.results.layout import (
    BUNDLE,
    CHECKPOINT,
    CONFIG_JSON,
    LEARNING_CURVE_PNG,
    ROUNDS_CSV,
    ROUNDS_JSONL,
    RUN_LOCK,
    SUMMARY_JSON,
)
from fedmer.results.rounds import CSV_COLUMNS

__all__ = ["RunFolderError", "RunRecorder", "claim_run_folder", "json_clean", "read_rounds"]

log = logging.getLogger(__name__)


def json_clean(value: Any) -> Any:
    """JSON has no infinity: write it as the string 'inf' (NaN as None)."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    return value


class RunFolderError(RuntimeError):
    """The run folder holds a finished run, or another live run is writing it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_run_folder(out_dir: Path) -> None:
    """Make ``out_dir`` this process's run folder, or refuse: one run per folder.

    A folder with a ``summary.json`` holds a finished run and is never overwritten; a folder
    whose lock names a live process is in use (two runs would interleave ``rounds.csv`` and one
    would report the other's result). A lock left by a dead process (a killed run) is taken
    over with a warning.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / SUMMARY_JSON).exists():
        raise RunFolderError(
            f"{out_dir} already holds a finished run ({SUMMARY_JSON}); a run never overwrites another: "
            "give this one its own output.dir (Hydra does: outputs/DATE/TIME) or move the old one away"
        )
    lock = out_dir / RUN_LOCK
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        text = lock.read_text().strip()
        holder = int(text) if text.isdigit() else 0
        if holder and _alive(holder):
            raise RunFolderError(
                f"{out_dir} is in use by the run of process {holder} ({RUN_LOCK}); "
                "give this run its own output.dir"
            ) from None
        log.warning("%s: taking over the folder of a run that is gone (process %s)", out_dir, holder or "?")
        lock.write_text(str(os.getpid()))
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))


@dataclass
class RunRecorder:
    """Writes one run's files into ``out_dir`` as the run goes."""

    out_dir: Path
    cfg: ExperimentConfig
    rows: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        claim_run_folder(self.out_dir)
        for name in (ROUNDS_JSONL, ROUNDS_CSV):
            (self.out_dir / name).unlink(missing_ok=True)
        config = {"run_config": self.cfg.to_run_config(), "privacy": privacy_statement(self.cfg)}
        (self.out_dir / CONFIG_JSON).write_text(json.dumps(json_clean(config), indent=2))
        with open(self.out_dir / ROUNDS_CSV, "w", newline="") as fh:
            csv.writer(fh).writerow(CSV_COLUMNS)

    def record(self, row: dict[str, Any], detail: dict[str, Any]) -> None:
        """Append one round: ``row`` has the CSV columns, ``detail`` the rest (per class, per client)."""
        missing = set(CSV_COLUMNS) - set(row)
        if missing:
            raise KeyError(f"round row lacks columns {sorted(missing)}")
        self.rows.append(row)
        with open(self.out_dir / ROUNDS_JSONL, "a") as fh:
            fh.write(json.dumps(json_clean({**row, **detail})) + "\n")
        with open(self.out_dir / ROUNDS_CSV, "a", newline="") as fh:
            csv.writer(fh).writerow([json_clean(row[c]) for c in CSV_COLUMNS])

    def finish(self, state_dict: dict[str, torch.Tensor], extra: dict[str, Any]) -> dict[str, Any]:
        """Write the checkpoint and summary; return the summary."""
        torch.save(state_dict, self.out_dir / CHECKPOINT)
        final = self.rows[-1] if self.rows else {}
        bundle = write_run_bundle(self.out_dir / BUNDLE, self.cfg, state_dict, final)
        summary = {
            "final": final,
            "best_uar": max((r["uar"] for r in self.rows), default=None),
            "rounds": len(self.rows) - 1,
            "privacy": privacy_statement(self.cfg),
            "files": {
                "rounds_csv": ROUNDS_CSV,
                "rounds_jsonl": ROUNDS_JSONL,
                "checkpoint": CHECKPOINT,
                "learning_curve": LEARNING_CURVE_PNG,
                **({"bundle": BUNDLE} if bundle else {}),
            },
            **extra,
        }
        (self.out_dir / SUMMARY_JSON).write_text(json.dumps(json_clean(summary), indent=2))
        (self.out_dir / RUN_LOCK).unlink(missing_ok=True)  # finished: summary.json now guards the folder
        return summary


def read_rounds(out_dir: str | Path) -> list[dict[str, Any]]:
    """The per-round records of a finished (or interrupted) run."""
    path = Path(out_dir) / ROUNDS_JSONL
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
