"""Turn a sweep (a Hydra multirun folder) into one tidy CSV and a Markdown report with plots.

Each run folder holds ``config.json`` (its flat run config) and ``rounds.jsonl``; this
module reads every run under a folder, writes ``runs.csv`` (one row per run: the swept
settings, final held-out metrics, the epsilon with its delta, accountant and unit) and
``rounds.csv`` (one row per run and round, for learning curves), and a ``report.md``
with UAR-versus-epsilon (mean and standard deviation over seeds) and learning curves.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedmer.plots import save_figure
from fedmer.results import ROUNDS_JSONL, read_rounds

__all__ = ["collect_runs", "write_report"]

log = logging.getLogger(__name__)

RUN_COLUMNS = (
    "run", "data", "scenario", "strategy", "fusion", "privacy_mode", "target_epsilon", "seed",
    "uar", "accuracy", "macro_f1", "epsilon", "client_epsilon", "delta", "accountant", "unit", "rounds",
)  # fmt: skip


def _eps(value: Any) -> float:
    return math.inf if value in ("inf", None) else float(value)


def collect_runs(root: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-run and per-round rows of every finished run below ``root`` (unfinished runs are reported)."""
    runs, rounds = [], []
    for config_path in sorted(Path(root).rglob("config.json")):
        run_dir = config_path.parent
        if not (run_dir / ROUNDS_JSONL).exists():
            log.warning("skipping %s: no rounds.jsonl (the run did not start)", run_dir)
            continue
        cfg = json.loads(config_path.read_text())
        rc, privacy = cfg["run_config"], cfg.get("privacy", {})
        rows = read_rounds(run_dir)
        if len(rows) - 1 < int(rc["federation.num_rounds"]):
            log.warning(
                "%s stopped after round %d of %s; reported as is",
                run_dir,
                len(rows) - 1,
                rc["federation.num_rounds"],
            )
        name = str(run_dir.relative_to(root)) if run_dir != Path(root) else run_dir.name
        final = rows[-1]
        runs.append(
            {
                "run": name,
                "data": rc["data.name"],
                "scenario": rc["data.scenario"],
                "strategy": rc["strategy.name"],
                "fusion": rc["model.fusion"],
                "privacy_mode": rc["privacy.mode"],
                "target_epsilon": rc["privacy.target_epsilon"] if rc["privacy.mode"] != "off" else math.inf,
                "seed": rc["seed"],
                "uar": final["uar"],
                "accuracy": final["accuracy"],
                "macro_f1": final["macro_f1"],
                "epsilon": _eps(final["epsilon_max"]),
                "client_epsilon": final.get("client_epsilon"),
                "delta": final["delta"],
                "accountant": final["accountant"],
                "unit": privacy.get("unit", "none"),
                "rounds": len(rows) - 1,
            }
        )
        rounds.extend(
            {"run": name, "round": r["round"], "uar": r["uar"], "epsilon": _eps(r["epsilon_max"])}
            for r in rows
        )
    return runs, rounds


def write_report(root: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write runs.csv, rounds.csv, uar_vs_epsilon.png, learning_curves.png and report.md; return report.md."""
    runs, rounds = collect_runs(root)
    if not runs:
        raise FileNotFoundError(f"no finished runs (config.json + rounds.jsonl) under {root}")
    out = Path(out_dir or root)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows, columns in (
        ("runs.csv", runs, RUN_COLUMNS),
        ("rounds.csv", rounds, ("run", "round", "uar", "epsilon")),
    ):
        with open(out / name, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["strategy"], r["privacy_mode"], r["target_epsilon"])].append(r)
    table = [
        "| strategy | privacy | target ε | runs | UAR mean ± sd | max ε reached (δ, accountant) |",
        "|---|---|---|---|---|---|",
    ]
    series: dict[tuple, list[tuple[float, float, float]]] = defaultdict(list)
    for (strategy, mode, target), members in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])
    ):
        uars = [m["uar"] for m in members]
        mean, sd = statistics.fmean(uars), (statistics.stdev(uars) if len(uars) > 1 else 0.0)
        eps = max(m["epsilon"] for m in members)
        first = members[0]
        reached = "∞" if math.isinf(eps) else f"{eps:.3g} (δ={first['delta']:g}, {first['accountant']})"
        table.append(
            f"| {strategy} | {mode} | {target:g} | {len(members)} | {mean:.3f} ± {sd:.3f} | {reached} |"
        )
        series[(strategy, mode)].append((target, mean, sd))
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    finite = [t for (_, _), pts in series.items() for t, _, _ in pts if math.isfinite(t)]
    inf_x = (max(finite) * 2) if finite else 1.0
    for (strategy, mode), pts in sorted(series.items()):
        pts.sort()
        xs = [inf_x if math.isinf(t) else t for t, _, _ in pts]
        ax.errorbar(
            xs,
            [m for _, m, _ in pts],
            yerr=[s for _, _, s in pts],
            marker="o",
            capsize=3,
            label=f"{strategy}, {mode}",
        )
    ax.set_xscale("log")
    ax.set_xlabel("target ε (rightmost point: no DP)")
    ax.set_ylabel("held-out UAR (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, out / "uar_vs_epsilon.png")
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    by_run: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rounds:
        by_run[r["run"]].append((r["round"], r["uar"]))
    for name, pts in by_run.items():
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            alpha=0.6,
            linewidth=1,
            label=name if len(by_run) <= 8 else None,
        )
    ax.set_xlabel("round")
    ax.set_ylabel("held-out UAR")
    ax.grid(alpha=0.3)
    if len(by_run) <= 8:
        ax.legend(fontsize=7)
    save_figure(fig, out / "learning_curves.png")
    report = out / "report.md"
    report.write_text(
        f"# Sweep report: {Path(root).resolve()}\n\n{len(runs)} finished runs. Epsilon is per sample "
        "(one training sequence) within each client, cumulative over the run, max over clients; "
        "its delta and accountant are given with it.\n\n"
        + "\n".join(table)
        + "\n\n![UAR vs epsilon](uar_vs_epsilon.png)\n\n![learning curves](learning_curves.png)\n\n"
        "Data: `runs.csv` (one row per run), `rounds.csv` (one row per run and round).\n"
    )
    return report
