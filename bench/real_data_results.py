"""Held-out-person results on the real datasets: centralised vs federated, with and without DP.

The runs are data: ``bench/plans/real_data.yaml`` lists each one (id, group, labels, training
kind, Hydra overrides). ``federated`` is a Flower simulation (``python -m simulations.run`` in a
subprocess: a fresh process and a log per run), ``centralised`` the same model without
federation or DP on the pooled client data (``fedmer.training.centralized``), ``logistic
regression`` the RAVDESS reference of ``bench.ravdess_reference`` on the run's own split; all
are scored on the same held-out persons. ``--only`` picks groups (default abcdef); what they
are (also the plan's group headers), and what the columns mean: ``docs/results.md``.

Each run's folder is ``outputs/real_data/<run id>-seed<s>/``; a run whose result file exists is
not repeated, so the script resumes where it stopped. Rows go to
``bench/results/real_data_results.csv``, which is also the tables' source (``--tables`` adds
finished runs on disk that it lacks), and the tables to ``bench/results/real_data_results.md``.

    nice -n 19 .venv/bin/python -m bench.real_data_results [--only abcdef] [--seeds 0 1 2] [--match ID]
    nice -n 19 .venv/bin/python -m bench.real_data_results --plan     # print the plan, run nothing
    nice -n 19 .venv/bin/python -m bench.real_data_results --tables   # rewrite the tables only
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from bench.ravdess_reference import heldout_reference
from fedmer.data.registry import load_split
from fedmer.privacy.ledger import read_ledger
from fedmer.results.layout import SUMMARY_JSON
from fedmer.results.reader import RunArtifacts, load_run, load_run_model
from fedmer.results.recorder import read_rounds
from fedmer.results.report import group_rows, mean_sd_text, pivot_table, write_csv
from fedmer.training.centralized import default_epochs, train_centralized
from fedmer.training.loops import evaluate_model
from simulations.compose import compose_experiment

Row = dict[str, Any]
log = logging.getLogger("real_data_results")
ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "bench" / "plans" / "real_data.yaml"
RUNS_DIR = ROOT / "outputs" / "real_data"
CSV_PATH = ROOT / "bench" / "results" / "real_data_results.csv"
MD_PATH = CSV_PATH.with_suffix(".md")
LABELS = ("group", "dataset", "setting", "training", "privacy")
FIELDS = (
    *LABELS, "uar", "macro_f1", "accuracy", "uar_last5", "uar_complete_test", "best_uar", "chance_uar",
    "epsilon_max", "noise_multiplier", "delta", "accountant", "unit", "budget", "seed", "overrides",
    "run_dir", "wall_s_under_load",
)  # fmt: skip
#: The privacy columns of a row trained without DP (reference and centralised runs).
NO_DP = dict(epsilon_max="inf", noise_multiplier="0 (no DP)", delta="", accountant="", unit="none (no DP)")
#: The columns of the summary table: (training, privacy) -> header.
PIVOT = {
    ("centralised", "none"): "centralised, no DP",
    ("federated", "none"): "federated, no DP",
    ("federated", "eps 8"): "federated, DP ε=8",
    ("federated", "eps 1"): "federated, DP ε=1",
}


@dataclass(frozen=True)
class Run:
    """One entry of the plan: a federated simulation, its centralised counterpart or a reference fit."""

    id: str
    group: str
    dataset: str
    setting: str
    training: str
    privacy: str
    overrides: tuple[str, ...]

    def folder(self, seed: int) -> Path:
        """Where this run keeps its result at ``seed`` (resuming finds it there)."""
        return RUNS_DIR / f"{self.id}-seed{seed}"


def load_plan(path: Path = PLAN) -> list[Run]:
    """The plan file's runs in priority order; a repeated id or an unknown training kind is an error."""
    runs = [Run(**{**e, "overrides": tuple(e["overrides"])}) for e in yaml.safe_load(path.read_text())]
    unknown = {r.training for r in runs} - MEASURE.keys()
    if unknown or len({r.id for r in runs}) != len(runs):
        raise ValueError(f"{path}: repeated run ids or unknown training kinds {sorted(unknown)}")
    return runs


def federated(run: Run, seed: int, folder: Path) -> Row:
    """A Flower simulation (unless already on disk): its final round, privacy and run time."""
    if not (folder / SUMMARY_JSON).exists():
        where = [f"seed={seed}", f"hydra.run.dir={folder}"]
        cmd = [sys.executable, "-m", "simulations.run", *run.overrides, *where]
        log.info("running: %s", " ".join(cmd))
        with open(folder.parent / f"{folder.name}.log", "w") as out:
            subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=True)
    art = load_run(folder)
    s = art.summary or {}
    last5 = [r["uar"] for r in read_rounds(folder) if r["round"] > 0][-5:]
    return {
        **{k: s["final"][k] for k in ("uar", "macro_f1", "accuracy", "epsilon_max", "delta", "accountant")},
        "uar_last5": sum(last5) / len(last5),
        "uar_complete_test": complete_test_uar(art),
        **{k: s[k] for k in ("best_uar", "chance_uar")},
        "noise_multiplier": noise_multipliers(art),
        "unit": s["privacy"]["unit"],
        "budget": "see overrides: num_rounds x local_epochs per client",
        "wall_s_under_load": s["wall_time_s"],
    }


def noise_multipliers(art: RunArtifacts) -> str:
    """The noise behind a run's epsilon, from its clients' ledgers: DP-SGD's (training rounds), e.g.
    "3.61" or "3.2-3.6", plus the feature-statistics release's (round 0) when the run made one."""
    sgd, release = set(), set()
    for path in map(art.ledger_path, range(art.cfg.federation.num_clients)):
        for e in read_ledger(path).entries if path.exists() else ():
            (sgd if e.server_round > 0 else release).add(round(e.noise, 3))
    if not sgd and not release:
        return "0 (no DP)"
    text = "" if not sgd else f"{min(sgd):g}" if len(sgd) == 1 else f"{min(sgd):g}-{max(sgd):g}"
    return text + (f" (statistics release {min(release):g})" if release else "")


def complete_test_uar(art: RunArtifacts) -> float | str:
    """Final model's UAR on the held-out samples with every modality ("" if all or none have one missing)."""
    test = art.split().test
    complete = np.flatnonzero(test.mask.all(axis=1))
    if not 0 < len(complete) < len(test):
        return ""
    return evaluate_model(load_run_model(art), test.subset(complete))["uar"]


def centralised(run: Run, seed: int, folder: Path) -> Row:
    """The same model without federation or DP on the pooled client data: what federation costs."""
    out = folder / "centralized.json"
    if not out.exists():
        exp = compose_experiment([*run.overrides, f"seed={seed}"], folder)
        torch.set_num_threads(1)  # as each simulated client does
        log.info("centralised: %s (%d epochs)", " ".join(run.overrides), default_epochs(exp))
        out.write_text(json.dumps(train_centralized(exp), indent=1))
    r = json.loads(out.read_text())
    last5 = [point["uar"] for point in r["curve"]][-5:]
    return {
        **{k: r[k] for k in ("uar", "macro_f1", "accuracy", "best_uar", "chance_uar")},
        "uar_last5": sum(last5) / len(last5),
        "uar_complete_test": "" if r.get("complete_uar") is None else r["complete_uar"],
        **NO_DP,
        "budget": f"{r['epochs']} epochs on {r['train_samples']} pooled samples",
        "wall_s_under_load": round(r["wall_s"], 1),
    }


def reference(run: Run, seed: int, folder: Path) -> Row:
    """The RAVDESS logistic regression (l2 0.01) on this run's own split: how far the features go."""
    out = folder / "reference.json"
    if not out.exists():
        torch.set_num_threads(1)
        split = load_split(compose_experiment([*run.overrides, f"seed={seed}"], folder))
        report = heldout_reference(split, standardise=not run.training.endswith("raw"))
        out.write_text(json.dumps(report, indent=1))
    r = json.loads(out.read_text())
    return {
        **{k: r[k] for k in ("uar", "macro_f1", "accuracy", "chance_uar")},
        **{k: r["uar"] for k in ("uar_last5", "best_uar")},
        "uar_complete_test": "",
        **NO_DP,
        "budget": "L-BFGS to convergence, l2 0.01 (bench/ravdess_reference.py)",
        "wall_s_under_load": "",
    }


#: training kind -> how a run of that kind is measured, and the file that says it was.
MEASURE: dict[str, tuple[Callable[[Run, int, Path], Row], str]] = {
    "federated": (federated, SUMMARY_JSON),
    "centralised": (centralised, "centralized.json"),
    "logistic regression": (reference, "reference.json"),
    "logistic regression, raw": (reference, "reference.json"),
}


def measure(run: Run, seed: int, execute: bool) -> Row | None:
    """The CSV row of ``run``: measured now if ``execute`` (unless on disk), else read back (None if not)."""
    folder = run.folder(seed)
    fn, result_file = MEASURE[run.training]
    if not execute and not (folder / result_file).exists():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    row = {k: getattr(run, k) for k in LABELS}
    row.update(seed=seed, overrides=" ".join(run.overrides), run_dir=str(folder.relative_to(ROOT)))
    return {**row, **fn(run, seed, folder)}


def collect(plan: list[Run], fresh: Row | None = None) -> list[Row]:
    """Every planned run and seed with a result, in plan order: ``fresh``, else its CSV row, else read
    back from its folder (so the tables survive without ``outputs/``, and new runs join them)."""
    known: dict[str, Row] = {}
    if CSV_PATH.exists():
        with open(CSV_PATH, newline="") as fh:
            known = {row["run_dir"]: row for row in csv.DictReader(fh)}
    if fresh is not None:
        known[fresh["run_dir"]] = fresh
    seeds: dict[str, set[int]] = {}
    for name in {Path(d).name for d in known} | {p.name for p in RUNS_DIR.glob("*-seed*") if p.is_dir()}:
        run_id, _, seed = name.rpartition("-seed")
        if seed.isdigit():
            seeds.setdefault(run_id, set()).add(int(seed))
    rows = []
    for run in plan:
        for seed in sorted(seeds.get(run.id, ())):
            row = known.get(str(run.folder(seed).relative_to(ROOT))) or measure(run, seed, execute=False)
            rows += [row] if row is not None else []
    return rows


def pivot_column(row: Row) -> str | None:
    """The summary table's column of a row (None: not in it), so DP and federation costs line up."""
    return PIVOT.get((row["training"], row["privacy"]))


def write_tables(rows: list[Row]) -> None:
    """CSV of every (run, seed) row; Markdown: one line per run (mean ± sd over its seeds), then the pivot."""
    CSV_PATH.parent.mkdir(parents=True, exist_ok=True)
    write_csv(CSV_PATH, rows, FIELDS)
    lines = [
        "| group | dataset | setting | training | DP | seeds | UAR | UAR last 5 | UAR, all-modality test "
        "clips | macro-F1 | acc | chance | max ε (δ) | noise σ |",
        "|" + "---|" * 14,
    ]
    for same in group_rows(rows, lambda r: r["run_dir"].rsplit("-seed", 1)[0]).values():
        r, eps = same[0], max(float(x["epsilon_max"]) for x in same)
        complete = [float(x["uar_complete_test"]) for x in same if x["uar_complete_test"] != ""]

        def stat(key: str, same: list[Row] = same) -> str:
            return mean_sd_text([float(x[key]) for x in same])

        cells = [
            *(str(r[k]) for k in LABELS), ",".join(str(x["seed"]) for x in same),
            stat("uar"), stat("uar_last5"), mean_sd_text(complete) if complete else "",
            stat("macro_f1"), stat("accuracy"),
            f"{float(r['chance_uar']):.3f}", "∞" if eps == float("inf") else f"{eps:.2f} ({r['delta']})",
            "; ".join(sorted({str(x["noise_multiplier"]) for x in same})),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    main_groups = [r for r in rows if r["group"] in "abcdefsg"]  # not the tuning (t) nor hashed MELD (m)
    pivot = pivot_table(main_groups, ("dataset", "setting"), pivot_column, [*PIVOT.values()], "uar")
    MD_PATH.write_text("\n".join([*lines, "", *pivot]) + "\n")


def main() -> None:
    """Run the selected part of the plan (or print it, or only rewrite the tables)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="groups, e.g. 'ab' (default abcdef to run, every group with --plan)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to run (default 0)")
    parser.add_argument("--match", default="", help="only runs whose id contains this (e.g. 360-av)")
    parser.add_argument("--plan", "--list", action="store_true", help="print the selected runs, run nothing")
    parser.add_argument("--tables", action="store_true", help="only rewrite the tables (CSV + runs on disk)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    plan = load_plan()
    if args.tables:
        write_tables(collect(plan))
        return
    groups = args.only or ("".join(r.group for r in plan) if args.plan else "abcdef")
    runs = [r for r in plan if r.group in groups and args.match in r.id]
    if args.plan:
        for r in runs:
            print(r.group, r.id, " ".join(r.overrides))
        return
    for i, run in enumerate(runs, start=1):
        for seed in args.seeds:
            start = time.perf_counter()
            print(f"[{i}/{len(runs)}] {run.group} {run.id} seed {seed}", flush=True)
            try:
                row = measure(run, seed, execute=True)
            except subprocess.CalledProcessError as err:
                print(f"    FAILED ({err}); see {run.folder(seed).relative_to(ROOT)}.log", flush=True)
                continue
            assert row is not None  # measure() with execute=True always returns a row
            write_tables(collect(plan, fresh=row))
            print(
                f"    UAR {row['uar']:.3f}  macro-F1 {row['macro_f1']:.3f}  acc {row['accuracy']:.3f}  "
                f"eps {row['epsilon_max']}  ({time.perf_counter() - start:.0f} s under load)",
                flush=True,
            )


if __name__ == "__main__":
    main()
