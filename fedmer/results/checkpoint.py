"""The resume checkpoint: what a killed run needs to continue exactly where its last round ended.

After every evaluated round the ServerApp writes ``checkpoint.pt`` into the run folder: the
global model, the strategy's state (FedAdam's moments, a DP wrapper's accountant), the round,
the sampling RNG states, the round reports and a privacy summary. The write is atomic (temp
file in the same folder, fsync, ``os.replace``), so a SIGKILL leaves the previous checkpoint or
the new one, never half of one. The file holds only tensors and plain Python values and is
read with ``torch.load(weights_only=True)``: no pickled objects, nothing executed on load.

:func:`resumable_checkpoint` is the one gate for ``resume=<run folder>``: it refuses a folder
that is absent, finished, without a checkpoint, or written under a different config (naming
every changed key), so a resume can only ever continue the same experiment.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from fedmer.atomic import atomic_write
from fedmer.config import ConfigError, ExperimentConfig
from fedmer.results.layout import RESUME_CHECKPOINT, ROUNDS_CSV, ROUNDS_JSONL, SUMMARY_JSON
from fedmer.results.recorder import RunRecorder, claim_run_folder
from fedmer.results.rounds import CSV_COLUMNS

__all__ = [
    "CHECKPOINT_FORMAT",
    "NOT_COMPARED",
    "ContinuedRecorder",
    "ResumeError",
    "RoundCheckpoint",
    "config_differences",
    "continue_rounds",
    "load_checkpoint",
    "resumable_checkpoint",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fedmer-checkpoint/1"
#: Run-config keys a resumed run may change: where Hydra logs it, and the resume request itself.
NOT_COMPARED = frozenset({"output.dir", "resume"})


class ResumeError(ConfigError):
    """The folder cannot be resumed (absent, finished, no checkpoint, or another config)."""


@dataclass(frozen=True)
class RoundCheckpoint:
    """The state of a run after ``server_round`` rounds (0: after the pre-training steps)."""

    server_round: int
    run_config: dict[str, Any]  # the flat run config the run was started with
    run_id: int  # Flower's run id of the run that started the folder: its ledger entries' tag
    model: dict[str, torch.Tensor]  # the global model after this round
    strategy: dict[str, Any] = field(default_factory=dict)  # fedmer.federation.resume.strategy_state
    rng: dict[str, Any] = field(default_factory=dict)  # Python / NumPy / torch generator states
    rounds: list[dict[str, Any]] = field(default_factory=list)  # the RoundReports so far, as dicts
    privacy: dict[str, Any] = field(default_factory=dict)  # epsilon so far (for a person reading it)
    extra: dict[str, Any] = field(default_factory=dict)  # summary items from before round 1
    elapsed_s: float = 0.0  # wall time the run had spent when it wrote this


def save_checkpoint(out_dir: Path, ckpt: RoundCheckpoint) -> Path:
    """Write ``ckpt`` to ``out_dir/checkpoint.pt`` atomically; return the path."""
    path = Path(out_dir) / RESUME_CHECKPOINT
    payload = {"format": CHECKPOINT_FORMAT, **asdict(ckpt)}
    atomic_write(path, lambda fh: torch.save(payload, fh), binary=True)
    return path


def load_checkpoint(out_dir: Path) -> RoundCheckpoint:
    """Read ``out_dir/checkpoint.pt``; a missing or unreadable file is a :class:`ResumeError`."""
    path = Path(out_dir) / RESUME_CHECKPOINT
    if not path.exists():
        raise ResumeError(
            f"{out_dir} has no {RESUME_CHECKPOINT}: the run never finished a round there, "
            "so there is nothing to resume; start a new run"
        )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt file
        raise ResumeError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise ResumeError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    names = {f.name for f in fields(RoundCheckpoint)}
    missing = sorted(names - set(raw))
    if missing:
        raise ResumeError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return RoundCheckpoint(**{k: v for k, v in raw.items() if k in names})


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: checkpoint <old>, this run <new>`` for each run-config key that differs."""
    keys = sorted((set(saved) | set(now)) - NOT_COMPARED)
    return [
        f"{k}: checkpoint {saved.get(k, '<absent>')!r}, this run {now.get(k, '<absent>')!r}"
        for k in keys
        if not _same(saved.get(k), now.get(k))
    ]


def resumable_checkpoint(folder: str | Path, cfg: ExperimentConfig) -> RoundCheckpoint:
    """The checkpoint to continue ``folder`` from, if ``cfg`` is the experiment it holds.

    Refuses (:class:`ResumeError`, naming the reason) a folder that does not exist, holds a
    finished run (``summary.json``), has no checkpoint, or was started with another config.
    """
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise ResumeError(f"invalid resume={str(folder)!r}: no such run folder")
    if (path / SUMMARY_JSON).exists():
        raise ResumeError(
            f"invalid resume={str(folder)!r}: the run there finished ({SUMMARY_JSON}); "
            "a finished run is never continued or overwritten"
        )
    ckpt = load_checkpoint(path)
    diff = config_differences(ckpt.run_config, cfg.to_run_config())
    if diff:
        raise ResumeError(
            f"invalid resume={str(folder)!r}: the run there was started with another config; "
            "resume with the same overrides. Changed: " + "; ".join(diff)
        )
    if ckpt.server_round > cfg.federation.num_rounds:
        raise ResumeError(f"{path}: checkpoint at round {ckpt.server_round} is past the run's last round")
    return ckpt


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _number(value: Any) -> Any:
    """JSON's "inf" / "-inf" back to floats (what the run's rows held before writing)."""
    return {"inf": math.inf, "-inf": -math.inf}.get(value, value) if isinstance(value, str) else value


def continue_rounds(out_dir: Path, last_round: int) -> list[dict[str, Any]]:
    """Cut ``rounds.jsonl`` / ``rounds.csv`` back to rounds ``<= last_round``; return those rows.

    A round is recorded before its checkpoint is written, so a run killed in between has a row
    the checkpoint does not cover; the resumed run redoes that round and must not list it twice.
    """
    out_dir = Path(out_dir)
    jsonl, table = out_dir / ROUNDS_JSONL, out_dir / ROUNDS_CSV
    lines = [ln for ln in jsonl.read_text().splitlines() if ln.strip()] if jsonl.exists() else []
    kept = [ln for ln in lines if int(json.loads(ln)["round"]) <= last_round]
    rows = [{k: _number(json.loads(ln).get(k)) for k in CSV_COLUMNS} for ln in kept]
    if [r["round"] for r in rows] != list(range(last_round + 1)):
        raise ResumeError(
            f"{jsonl}: rounds {[r['round'] for r in rows]} recorded, but the checkpoint is at round "
            f"{last_round}; the run folder was edited or mixed with another run"
        )
    with open(table, newline="") as fh:
        cells = list(csv.reader(fh))
    body = [c for c in cells[1:] if c and int(c[0]) <= last_round]
    _replace_text(jsonl, "".join(ln + "\n" for ln in kept))
    with open(table.with_name(f".{table.name}.tmp"), "w", newline="") as fh:
        csv.writer(fh).writerows([cells[0], *body])
    os.replace(table.with_name(f".{table.name}.tmp"), table)
    dropped = len(lines) - len(kept)
    if dropped:
        log.info("%s: dropped %d round row(s) past the checkpoint's round %d", out_dir, dropped, last_round)
    return rows


@dataclass
class ContinuedRecorder(RunRecorder):
    """A :class:`RunRecorder` that goes on writing a resumed run's folder after ``last_round``.

    It claims the folder (a live run's lock still refuses it), keeps ``config.json`` and the
    rows up to the checkpoint, and appends from there: one row per round, none twice.
    """

    last_round: int = 0

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        claim_run_folder(self.out_dir)
        for stale in self.out_dir.glob(f".{RESUME_CHECKPOINT}.*.tmp"):  # a write the kill cut short
            stale.unlink(missing_ok=True)
        self.rows = continue_rounds(self.out_dir, self.last_round)
