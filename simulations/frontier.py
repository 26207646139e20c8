"""The privacy/accuracy frontier as a Hydra callback: audit every run, then write the report.

``python -m simulations.run -m +experiment=frontier`` is the whole experiment: the union
sweeper runs its grids (configs/experiment/frontier.yaml), the joblib launcher two jobs side by
side, and this callback, registered there, hooks into it. After each job (in the worker that
ran it) it runs the membership-inference audit on that run's final model (the loss-threshold
attack on every run; LiRA with shadows on the runs of ``lira_seeds`` when ``shadows`` > 0,
since its shadows cost as much as the run), writes a marker with the job's outcome, and prints
where the sweep stands (runs done and failed, counted from those markers on disk, so every
worker sees the same count; elapsed; estimated time left). When the sweep ends it writes the
report (:func:`fedmer.results.report.write_report`) and the sweep's wall time into the sweep
folder. A failed audit is logged and written down as a file next to the run, never skipped
silently.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console

from fedmer.results.layout import SUMMARY_JSON
from hydra_plugins.fedmer_union_sweeper import union_jobs

__all__ = ["AUDIT_ERROR", "FRONTIER_JSON", "JOB_DONE", "FrontierCallback", "jobs_done", "sweep_size"]

log = logging.getLogger(__name__)

#: Written into a run folder when its audit fails (the reason, so the gap is visible).
AUDIT_ERROR = "audit_error.txt"
#: Written into the sweep folder at the end: jobs, wall time, where the report is.
FRONTIER_JSON = "frontier.json"
#: Written into each job's folder when it ends (status, final UAR): the sweep's progress on disk.
JOB_DONE = "frontier_job.json"
#: Written into the sweep folder at the start: the sweep's size and start time (for every worker).
SWEEP_START = "frontier_start.json"


def sweep_size(config: DictConfig) -> int:
    """How many jobs the sweeper will launch: the union sweeper's jobs, or the basic sweeper's product."""
    hydra_cfg = config.hydra
    task = list(hydra_cfg.overrides.task)
    if hydra_cfg.sweeper.get("grids"):
        sweeper = hydra_cfg.sweeper
        return len(union_jobs(sweeper.grids, sweeper.get("params"), task, select=sweeper.get("select")))
    overrides = [f"{k}={v}" for k, v in (hydra_cfg.sweeper.get("params") or {}).items()] + task
    parsed = OverridesParser.create().parse_overrides(overrides)
    sizes: dict[str, int] = {}
    for o in parsed:  # a command-line override replaces the config's sweep of the same key
        sizes[o.key_or_group] = len(list(o.sweep_iterator())) if o.is_sweep_override() else 1
    return math.prod(sizes.values()) if sizes else 1


def jobs_done(sweep_dir: Path) -> tuple[int, int]:
    """(jobs ended, jobs failed) under ``sweep_dir``, from the markers the jobs wrote."""
    markers = [json.loads(p.read_text()) for p in sweep_dir.glob(f"*/{JOB_DONE}")]
    return len(markers), sum(m["status"] != "completed" for m in markers)


class FrontierCallback(Callback):
    """Audit each finished run; report the sweep when it ends."""

    def __init__(
        self, shadows: int = 4, lira_seeds: tuple[int, ...] | list[int] = (0,), audit: bool = True
    ) -> None:
        if shadows < 0 or shadows == 1:
            raise ValueError(f"invalid shadows={shadows}: use 0 (loss attack only) or at least 2")
        self.shadows = shadows
        self.lira_seeds = tuple(int(s) for s in lira_seeds)
        self.audit = audit

    @property
    def console(self) -> Console:
        """A console per use: the callback travels to the launcher's worker processes by pickle."""
        return Console(stderr=True)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        total = sweep_size(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_START).write_text(json.dumps({"jobs": total, "started": time.time()}))
        self.console.rule(f"[bold]frontier: {total} runs[/bold]")

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """In the worker that ran the job: audit it, mark it ended, print the sweep's progress."""
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        completed = job_return.status is JobStatus.COMPLETED
        if not completed:
            log.error(
                "frontier: run %s failed (%s); it is missing from the report",
                run_dir,
                job_return._return_value,
            )
        elif self.audit:
            self._audit(run_dir, int(config.seed))
        marker: dict[str, Any] = {"status": "completed" if completed else "failed"}
        if completed and (run_dir / SUMMARY_JSON).exists():
            marker["uar"] = float(json.loads((run_dir / SUMMARY_JSON).read_text())["final"]["uar"])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / JOB_DONE).write_text(json.dumps(marker))
        self._progress(Path(config.hydra.sweep.dir), marker.get("uar"))

    def _audit(self, run_dir: Path, seed: int) -> None:
        from fedmer.posthoc.audit.audit import audit_run

        try:
            # LiRA's shadows cost as much as the run itself: only for the chosen seeds.
            shadows = self.shadows if seed in self.lira_seeds else 0
            audit_run(run_dir, shadows=shadows, seed=seed)
        except Exception as err:  # recorded next to the run and in the log
            (run_dir / AUDIT_ERROR).write_text(f"{type(err).__name__}: {err}\n")
            log.error("frontier: audit of %s failed: %s", run_dir, err)

    def _progress(self, sweep_dir: Path, last_uar: float | None) -> None:
        start_file = sweep_dir / SWEEP_START
        if not start_file.exists():  # a single run with the frontier experiment (no multirun)
            return
        start = json.loads(start_file.read_text())
        done, failed = jobs_done(sweep_dir)
        elapsed = time.time() - start["started"]
        left = max(start["jobs"] - done, 0) * elapsed / max(done, 1)
        last = f"; last UAR {last_uar:.3f}" if last_uar is not None else ""
        self.console.rule(
            f"frontier: {done}/{start['jobs']} runs ({failed} failed), {elapsed / 60:.1f} min, "
            f"about {left / 60:.0f} min left{last}"
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from fedmer.results.report import write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        start = json.loads((sweep_dir / SWEEP_START).read_text())
        wall = time.time() - start["started"]
        done, failed = jobs_done(sweep_dir)
        report = write_report(sweep_dir)
        (sweep_dir / FRONTIER_JSON).write_text(
            json.dumps(
                {
                    "runs": done,
                    "failed": failed,
                    "wall_s": round(wall, 1),
                    "audit_shadows": self.shadows if self.audit else None,
                    "lira_seeds": list(self.lira_seeds),
                    "report": str(report),
                },
                indent=2,
            )
        )
        self.console.rule(
            f"[bold]frontier done: {done} runs ({failed} failed) in {wall / 60:.1f} min; {report}[/bold]"
        )
