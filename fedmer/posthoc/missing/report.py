"""``fedmer missing RUN_DIR``: the missing-modality evaluation of a finished run, on disk.

Writes a tidy ``missing.csv`` (one row per condition), ``missing.json`` (the same rows plus
what was evaluated: run, dataset, test persons, natural presence of each modality, chance
level) and ``missing.png`` (UAR per removed / kept-alone modality, and UAR against the
random missing rate with +-1 sd over draws and chance marked).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedmer.posthoc.missing.evaluate import RATES, MissingResult, chance_uar, evaluate_missing
from fedmer.results.figures import save_figure
from fedmer.results.reader import load_run, load_run_model

__all__ = ["CSV_COLUMNS", "MISSING_CSV", "MISSING_JSON", "MISSING_PNG", "format_table", "missing_run"]

log = logging.getLogger(__name__)

MISSING_CSV, MISSING_JSON, MISSING_PNG = "missing.csv", "missing.json", "missing.png"
CSV_COLUMNS = tuple(MissingResult.__dataclass_fields__)


def missing_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    rates: Sequence[float] = RATES,
    draws: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate the run's global model on its held-out test persons; write CSV, JSON, PNG; return the JSON."""
    run = load_run(run_dir)
    model, test = load_run_model(run), run.split().test
    results = evaluate_missing(model, test, rates=rates, draws=draws, seed=seed)
    out = Path(out_dir) if out_dir is not None else run.run_dir
    out.mkdir(parents=True, exist_ok=True)
    chance = chance_uar(test.num_classes)
    report = {
        "run_dir": str(run.run_dir.resolve()),
        "evaluated_on": f"{len(test)} held-out test sequences of {len(np.unique(test.person))} persons "
        "(in no client)",
        "dataset": run.cfg.data.name,
        "model": f"{run.cfg.model.encoder}/{run.cfg.model.fusion}",
        "modalities": list(test.modalities),
        "natural_presence": {m: float(test.mask[:, j].mean()) for j, m in enumerate(test.modalities)},
        "natural_no_modality": int((~test.mask.any(axis=1)).sum()),
        "classes": list(test.class_names),
        "chance_uar": chance,
        "random_drop": {"rates": [float(r) for r in rates], "draws": draws, "seed": seed},
        "privacy": run.final_privacy(),
        "files": {"csv": MISSING_CSV, "plot": MISSING_PNG},
        "results": [r.to_json() for r in results],
    }
    (out / MISSING_JSON).write_text(json.dumps(report, indent=2))
    with open(out / MISSING_CSV, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(r.to_json() for r in results)
    plot_missing(results, out / MISSING_PNG, chance=chance, title=f"{run.cfg.data.name}: {report['model']}")
    log.info("missing-modality evaluation of %s written to %s", run.run_dir, out)
    return report


def plot_missing(results: Sequence[MissingResult], path: Path, *, chance: float, title: str) -> Path:
    """Left: UAR with each modality removed / alone; right: UAR vs random missing rate."""
    natural = next(r for r in results if r.condition == "natural")
    fig, (bars, line) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    mods = [r.modality for r in results if r.condition == "removed"]
    pos = np.arange(len(mods))
    for k, (cond, label) in enumerate((("removed", "modality removed"), ("only", "modality alone"))):
        uar = [r.uar for r in results if r.condition == cond]
        bars.bar(pos + (k - 0.5) * 0.38, uar, width=0.38, label=label, color=("tab:blue", "tab:green")[k])
    bars.axhline(natural.uar, color="black", lw=1, label=f"all recorded ({natural.uar:.3f})")
    bars.axhline(chance, color="grey", ls=":", label=f"chance ({chance:.3f})")
    bars.set_xticks(pos, mods)
    bars.set_ylabel("UAR, held-out persons")
    bars.set_ylim(0, 1)
    bars.legend(fontsize=7, loc="upper right")
    bars.grid(axis="y", alpha=0.3)
    rand = [r for r in results if r.condition == "random"]
    x = [0.0] + [r.rate or 0.0 for r in rand]
    y = [natural.uar] + [r.uar for r in rand]
    sd = [0.0] + [r.uar_sd or 0.0 for r in rand]
    line.errorbar(x, y, yerr=sd, fmt="-o", ms=4, capsize=3, label="UAR (mean +- sd over draws)")
    line.axhline(chance, color="grey", ls=":", label="chance")
    line.set_xlabel("rate each present modality is dropped")
    line.set_ylim(0, 1)
    line.grid(alpha=0.3)
    line.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"missing modalities at test time ({title})", fontsize=10)
    return save_figure(fig, path)


def _sd(value: float | None) -> str:
    return "" if value is None else f" +-{value:.3f}"


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of the rows (what the CLI prints)."""
    lines = [f"{'condition':<10}{'modality/rate':<14}{'n':>6}{'none':>7}{'UAR':>14}{'acc':>8}{'F1':>8}"]
    for r in report["results"]:
        what = r["modality"] or ("" if r["rate"] is None else f"{r['rate']:g}")
        lines.append(
            f"{r['condition']:<10}{what:<14}{r['n']:>6}{r['n_no_modality']:>7.1f}"
            f"{r['uar']:>8.4f}{_sd(r['uar_sd']):<6}{r['accuracy']:>8.4f}{r['macro_f1']:>8.4f}"
        )
    lines.append(f"chance UAR {report['chance_uar']:.4f}; {report['evaluated_on']}")
    return "\n".join(lines)
