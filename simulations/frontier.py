"""The privacy/accuracy frontier as a Hydra callback: audit every run, then write the report.

``python -m simulations.run -m +experiment=frontier`` is the whole experiment: Hydra's sweeper
runs the grid (configs/experiment/frontier.yaml), and this callback, registered there, hooks
into it. After each job it runs the membership-inference audit on that run's final model
(the loss-threshold attack on every run; LiRA with a few shadows on the runs of
``lira_seeds``, since its shadows cost as much as the run), so attack AUC is measured at every
point of the grid; it prints where the sweep stands (runs done, elapsed, estimated time left); and
when the sweep ends it writes the report (:func:`fedmer.results.report.write_report`) and the
sweep's wall time into the sweep folder. A failed audit is logged and written down as a
file next to the run, never skipped silently.
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

__all__ = ["AUDIT_ERROR", "FRONTIER_JSON", "FrontierCallback", "sweep_size"]

log = logging.getLogger(__name__)

#: Written into a run folder when its audit fails (the reason, so the gap is visible).
AUDIT_ERROR = "audit_error.txt"
#: Written into the sweep folder at the end: jobs, wall time, where the report is.
FRONTIER_JSON = "frontier.json"


def sweep_size(config: DictConfig) -> int:
    """How many jobs the basic sweeper will launch: the product of every swept value list."""
    hydra_cfg = config.hydra
    overrides = [f"{k}={v}" for k, v in (hydra_cfg.sweeper.get("params") or {}).items()]
    overrides += list(hydra_cfg.overrides.task)
    parsed = OverridesParser.create().parse_overrides(overrides)
    sizes: dict[str, int] = {}
    for o in parsed:  # a command-line override replaces the config's sweep of the same key
        sizes[o.key_or_group] = len(list(o.sweep_iterator())) if o.is_sweep_override() else 1
    return math.prod(sizes.values()) if sizes else 1


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
        self.total = 0
        self.done = 0
        self.failed = 0
        self.t0 = time.monotonic()
        self.console = Console(stderr=True)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.total = sweep_size(config)
        self.t0 = time.monotonic()
        self.console.rule(f"[bold]frontier: {self.total} runs[/bold]")

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        self.done += 1
        if job_return.status is not JobStatus.COMPLETED:
            self.failed += 1
            log.error(
                "frontier: run %s failed (%s); it is missing from the report",
                run_dir,
                job_return._return_value,
            )
        elif self.audit:
            self._audit(run_dir, int(config.seed))
        self._progress(run_dir)

    def _audit(self, run_dir: Path, seed: int) -> None:
        from fedmer.posthoc.audit.audit import audit_run

        try:
            # LiRA's shadows cost as much as the run itself: only for the chosen seeds.
            shadows = self.shadows if seed in self.lira_seeds else 0
            audit_run(run_dir, shadows=shadows, seed=seed)
        except Exception as err:  # recorded next to the run and in the log
            (run_dir / AUDIT_ERROR).write_text(f"{type(err).__name__}: {err}\n")
            log.error("frontier: audit of %s failed: %s", run_dir, err)

    def _progress(self, run_dir: Path) -> None:
        elapsed = time.monotonic() - self.t0
        if self.total:
            left = max(self.total - self.done, 0) * elapsed / self.done
            where = f"{self.done}/{self.total} runs"
            eta = f", about {left / 60:.0f} min left"
        else:  # a single run with the frontier experiment (no multirun)
            where, eta = f"{self.done} run", ""
        summary = run_dir / SUMMARY_JSON
        last = ""
        if summary.exists():
            final = json.loads(summary.read_text())["final"]
            last = f"; last UAR {final['uar']:.3f}"
        self.console.rule(f"frontier: {where} ({self.failed} failed), {elapsed / 60:.1f} min{eta}{last}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from fedmer.results.report import write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        wall = time.monotonic() - self.t0
        report = write_report(sweep_dir)
        (sweep_dir / FRONTIER_JSON).write_text(
            json.dumps(
                {
                    "runs": self.done,
                    "failed": self.failed,
                    "wall_s": round(wall, 1),
                    "audit_shadows": self.shadows if self.audit else None,
                    "lira_seeds": list(self.lira_seeds),
                    "report": str(report),
                },
                indent=2,
            )
        )
        self.console.rule(f"[bold]frontier done: {self.done} runs in {wall / 60:.1f} min; {report}[/bold]")
