"""FedAvg against the robust strategies under each simulated attack: held-out UAR, 3 seeds.

    python -m bench.robustness                 # the whole grid (resumes: finished runs are kept)
    python -m bench.robustness --seeds 0       # one seed
    python -m bench.robustness --tables        # only rewrite the table and plot from runs on disk
    python -m bench.robustness --runner ray    # each cell as `fedmer run` (Ray), one at a time

Every cell runs FedMER's ServerApp and ClientApp on the same federation
(``BASE``) with ``faults.attack=<attack> faults.attacker_fraction=0.2`` (a fixed, seeded fifth of
the clients attacks whenever sampled; model attacks are rescaled to the clip bound C, so the
server's norm check cannot catch them by size). Writes ``bench/results/robustness.csv`` (one row
per run), ``robustness.md`` (mean ± sd per strategy and attack) and ``robustness.png``. By default
a cell runs in one process on :class:`simulations.sequential.SequentialGrid` (the Ray simulation's
metrics bit for bit, tested), two cells at a time; ``--runner ray`` runs ``fedmer run`` instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RUNS = ROOT / "outputs" / "robustness"
STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
ATTACKS = ("clean", "sign_flip", "scale", "noise", "nan", "label_flip")
ATTACKER_FRACTION = 0.2
#: 12 clients, 2 of them attackers: Bulyan (n >= 4f + 3) and Krum hold with num_malicious=2.
BASE = (
    "privacy=off",  # aggregation robustness alone; DP noise would blur the comparison on this small data
    "federation.num_clients=12",
    "federation.num_rounds=8",
    "federation.local_epochs=1",
    "federation.batch_size=32",
    "data.persons_per_site=3",
    "data.sequences_per_person=30",
    "strategy.num_malicious=2",
    "strategy.trim_beta=0.2",
    "faults.attack_scale=1.0",
)


def overrides(strategy: str, attack: str) -> list[str]:
    """The Hydra overrides of one cell."""
    fault = (
        []
        if attack == "clean"
        else [f"faults.attack={attack}", f"faults.attacker_fraction={ATTACKER_FRACTION}"]
    )
    return [*BASE, f"strategy={strategy}", *fault]


def _simulate(strategy: str, attack: str, seed: int, folder: Path) -> int:
    """One cell in this process on :class:`SequentialGrid`, one thread; 0, or 1 for a failed run.

    The same ServerApp and ClientApp (its fault mod included) as ``fedmer run``, without
    Ray: ``tests/e2e/test_simulation.py`` checks that this gives the Ray simulation's metrics
    bit for bit. No Ray start-up per cell, and two cells run at once on two cores.
    """
    import logging

    import torch

    from client.app import app as client_app
    from server.app import run_server
    from simulations.compose import compose_experiment
    from simulations.sequential import SequentialGrid

    torch.set_num_threads(1)
    folder.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=folder.parent / f"{folder.name}.log", level=logging.INFO, force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )  # fmt: skip
    cfg = compose_experiment([*overrides(strategy, attack), f"seed={seed}"], output_dir=folder)
    try:
        run_server(SequentialGrid(client_app, cfg.federation.num_clients, cfg.to_run_config()), cfg)
    except RuntimeError:
        logging.exception("run failed")  # summary.json says status failed when the run got that far
        return 1
    return 0


def run_one(strategy: str, attack: str, seed: int, runner: str = "sequential") -> dict[str, object]:
    """One simulation (kept on disk: a rerun of the bench skips it) and its row.

    ``runner``: ``sequential`` (:func:`_simulate`) or ``ray`` (``python -m simulations.run``).
    """
    folder = RUNS / f"{strategy}-{attack}-s{seed}"
    if not (folder / "summary.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        if runner == "sequential":
            rc = _simulate(strategy, attack, seed, folder)
        else:
            cmd = [sys.executable, "-m", "simulations.run", *overrides(strategy, attack), f"seed={seed}",
                   f"hydra.run.dir={folder}"]  # fmt: skip
            with open(folder.parent / f"{folder.name}.log", "w") as out:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
        if rc != 0 and not (folder / "summary.json").exists():
            return {"strategy": strategy, "attack": attack, "seed": seed, "status": f"exit {rc}"}
    s = json.loads((folder / "summary.json").read_text())
    return {
        "strategy": strategy,
        "attack": attack,
        "seed": seed,
        "status": s["status"],
        "uar": s["final"]["uar"],
        "accuracy": s["final"]["accuracy"],
        "epsilon_max": s["final"]["epsilon_max"],
        "clients_rejected": s.get("clients_rejected_total", 0),
        "clients_failed": s.get("clients_failed_total", 0),
        "aggregates_rejected": len(s.get("aggregates_rejected", [])),
        "wall_s": s["wall_time_s"],
    }


def collect(seeds: list[int]) -> list[dict[str, object]]:
    """Rows of every finished run on disk (of the grid)."""
    rows = []
    for strategy in STRATEGIES:
        for attack in ATTACKS:
            for seed in seeds:
                if (RUNS / f"{strategy}-{attack}-s{seed}" / "summary.json").exists():
                    rows.append(run_one(strategy, attack, seed))
    return rows


def _cell(rows: list[dict[str, object]], strategy: str, attack: str, status: str = "ok") -> list[float]:
    """UARs of the runs of one cell that ended with ``status`` (a failed run is shown as failed)."""
    return [
        float(r["uar"])  # type: ignore[arg-type]
        for r in rows
        if r["strategy"] == strategy and r["attack"] == attack and r.get("status") == status and "uar" in r
    ]


def write_tables(rows: list[dict[str, object]]) -> None:
    """CSV of every run, a Markdown mean ± sd table, and a grouped bar plot."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not rows:
        return
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with open(RESULTS / "robustness.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"Held-out UAR (mean ± sd [seeds]) with {ATTACKER_FRACTION:.0%} attackers; "
        "`python -m bench.robustness`. **failed**: runs that ended with status failed (exit 1, "
        "e.g. no round made a model); their UAR is not averaged in.",
        "",
        "| strategy | " + " | ".join(ATTACKS) + " |",
        "|---|" + "---|" * len(ATTACKS),
    ]
    for strategy in STRATEGIES:
        cells = []
        for attack in ATTACKS:
            v = _cell(rows, strategy, attack)
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            text = f"{statistics.fmean(v):.3f} ± {sd:.3f} [{len(v)}]" if v else "-"
            failed = len(_cell(rows, strategy, attack, "failed"))
            cells.append(text + (f", **failed** [{failed}]" if failed else ""))
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    (RESULTS / "robustness.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(STRATEGIES)
    for i, strategy in enumerate(STRATEGIES):
        means = [statistics.fmean(v) if (v := _cell(rows, strategy, a)) else 0.0 for a in ATTACKS]
        sds = [statistics.stdev(v) if len(v := _cell(rows, strategy, a)) > 1 else 0.0 for a in ATTACKS]
        xs = [j + (i - len(STRATEGIES) / 2 + 0.5) * width for j in range(len(ATTACKS))]
        ax.bar(xs, means, width, yerr=sds, capsize=2, label=strategy)
    ax.axhline(0.2, color="grey", linestyle=":", label="chance")
    ax.set_xticks(range(len(ATTACKS)), ATTACKS)
    ax.set_ylabel("held-out UAR")
    ax.set_title(f"Robust aggregation with {ATTACKER_FRACTION:.0%} attackers (synthetic driving, no DP)")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "robustness.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--tables", action="store_true", help="only rewrite the outputs from runs on disk")
    parser.add_argument(
        "--runner",
        choices=("sequential", "ray"),
        default="sequential",
        help="sequential: each cell in one process without Ray (default); ray: fedmer run",
    )
    parser.add_argument("--jobs", type=int, default=2, help="cells at once (sequential runner)")
    args = parser.parse_args()
    if not args.tables:
        grid = [(s, a, seed) for seed in args.seeds for a in args.attacks for s in args.strategies]
        start = time.perf_counter()
        jobs = args.jobs if args.runner == "sequential" else 1
        # spawn: a fresh interpreter per worker (no torch/Ray state forked), one cell per task
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 max_tasks_per_child=1) as pool:  # fmt: skip
            futures = {pool.submit(run_one, *cell, args.runner): cell for cell in grid}
            for i, future in enumerate(as_completed(futures), start=1):
                strategy, attack, seed = futures[future]
                row = future.result()
                elapsed = time.perf_counter() - start
                eta = elapsed / i * (len(grid) - i)
                where = f"[{i}/{len(grid)}] {strategy:14s} {attack:10s} seed {seed}"
                print(f"{where}: UAR {row.get('uar', '-')} ({row['status']}); {elapsed / 60:.1f} min, "
                      f"~{eta / 60:.0f} min left", flush=True)  # fmt: skip
    write_tables(collect(args.seeds))
    print(f"wrote {RESULTS / 'robustness.csv'}, robustness.md, robustness.png")


if __name__ == "__main__":
    main()
