"""Does DP-SGD make the global model leak less? Measured by attacking real federated runs.

Trains one non-private run (privacy=off) and private runs at target epsilon 8 and 1, each a
real Flower simulation (the same path as `make run`; only the privacy settings differ), then
audits each with `fedmer audit` (loss-threshold and LiRA membership inference against
client 0: its training sequences vs sequences of held-out persons, balanced) and prints /
writes the attack AUCs and TPR at 1% FPR next to the epsilon each run reports.

    .venv/bin/python bench/audit_leakage.py [--shadows K] [--name STEM] [hydra overrides...]

Writes bench/results/<STEM>.csv and <STEM>_roc_<run>.png (STEM defaults to audit_leakage).

Measured on 2 shared CPU cores, 8 shadows, seed 0 (runs are deterministic: a rerun gave the
same numbers). AUC with 95% stratified-bootstrap interval; epsilon is the max over
clients at delta=1e-5 (RDP, per sample). TPR at 0.1% FPR is not resolvable (< 1000
non-members).

Default config (10 clients x 640 sequences, 20 rounds x 2 local epochs), 640 members vs
640 non-members; `.venv/bin/python bench/audit_leakage.py`, 5.2 min in all:

    run  epsilon  UAR    loss AUC             LiRA online AUC      LiRA offline AUC   TPR@1% (loss/on/off)
    off  inf      0.832  0.541 [0.508,0.575]  0.559 [0.528,0.593]  0.524 [0.489,0.551]  2.3% / 0.5% / 1.3%
    eps8 8.00     0.764  0.487 [0.453,0.521]  0.506 [0.478,0.535]  0.463 [0.431,0.491]  3.6% / 2.5% / 1.6%
    eps1 0.99     0.537  0.403 [0.366,0.433]  0.491 [0.457,0.524]  0.505 [0.466,0.533]  2.0% / 0.0% / 0.0%

Overfit-prone variant (4x fewer sequences per person, 5 local epochs, batch 32; same for
all three runs), 160 vs 160; `.venv/bin/python bench/audit_leakage.py --name
audit_leakage_overfit data.sequences_per_person=20 federation.local_epochs=5
federation.batch_size=32`, 6.3 min:

    run  epsilon  UAR    loss AUC             LiRA online AUC      LiRA offline AUC   TPR@1% (loss/on/off)
    off  inf      0.845  0.609 [0.550,0.662]  0.604 [0.537,0.659]  0.601 [0.537,0.657]  0.0% / 6.9% / 0.6%
    eps8 7.99     0.485  0.447 [0.389,0.504]  0.521 [0.460,0.581]  0.490 [0.433,0.555]  1.3% / 0.6% / 0.6%
    eps1 0.99     0.185  0.488 [0.425,0.539]  0.508 [0.443,0.572]  0.453 [0.374,0.519]  0.0% / 0.0% / 0.0%

Reading: the non-private model leaks more than both private ones under the calibrated
attack (LiRA online: intervals above 0.5 without DP, covering 0.5 with it), but even it
leaks little on the default data. The loss-threshold AUC can fall below 0.5 (0.40 at
eps 1): members all come from client 0's site, non-members from every site, and sites
differ in difficulty (per-site held-out loss spans 0.14-1.47 on the non-private model),
so its global threshold measures site difficulty too; LiRA's per-example calibration
removes that offset. TPR at 1% FPR rests on 6 (default) or 1 (overfit) allowed false
positives and is noisy: do not rank runs by it.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fedmer.posthoc.audit.audit import audit_run
from fedmer.results.layout import AUDIT_PNG
from simulations.compose import compose_experiment
from simulations.run import run

ROOT = Path(__file__).resolve().parents[1]
RUNS: tuple[tuple[str, list[str]], ...] = (
    ("off", ["privacy=off"]),
    ("eps8", ["privacy=sample", "privacy.target_epsilon=8"]),
    ("eps1", ["privacy=sample", "privacy.target_epsilon=1"]),
)
ATTACKS = ("loss_threshold", "lira_online", "lira_offline")


def _fmt(value: float | str | None, spec: str = ".4f") -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else format(value, spec)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shadows", type=int, default=8, help="LiRA shadow models per audit")
    parser.add_argument("--name", default="audit_leakage", help="result file stem in bench/results")
    args, overrides = parser.parse_known_args(argv)
    rows = []
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for label, privacy in RUNS:
            run_dir = Path(tmp) / label
            exp = compose_experiment([*overrides, *privacy], run_dir)
            t0 = time.monotonic()
            summary = run(exp)
            t_run = time.monotonic() - t0
            report = audit_run(run_dir, client=0, shadows=args.shadows, seed=0)
            shutil.copy(run_dir / AUDIT_PNG, out / f"{args.name}_roc_{label}.png")
            final, attacks = summary["final"], report["attacks"]
            row = {
                "run": label,
                "epsilon_max": final["epsilon_max"],
                "client0_epsilon": report["privacy"].get("target_client_epsilon"),
                "delta": final["delta"],
                "accountant": final["accountant"],
                "heldout_uar": final["uar"],
                "n_members": attacks["loss_threshold"]["n_members"],
                "n_nonmembers": attacks["loss_threshold"]["n_nonmembers"],
                "train_s": round(t_run, 1),
                "audit_s": report["elapsed_s"],
            }
            for name in ATTACKS:
                a = attacks.get(name, {})
                row[f"{name}_auc"] = a.get("auc")
                row[f"{name}_auc_lo"], row[f"{name}_auc_hi"] = a.get("auc_ci95") or (None, None)
                row[f"{name}_tpr1"] = a.get("tpr_at_1pct_fpr")
            rows.append(row)
            print(
                f"{label}: eps {row['epsilon_max']} UAR {row['heldout_uar']:.3f} "
                + " ".join(f"{n} AUC {_fmt(row[f'{n}_auc'], '.3f')}" for n in ATTACKS),
                flush=True,
            )
    with open(out / f"{args.name}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(
            {k: round(v, 4) if isinstance(v, float) and k != "delta" else v for k, v in row.items()}
            for row in rows
        )
    _print_table(rows)


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'run':<5}{'epsilon':>9}{'delta':>8}{'UAR':>7}", end="")
    for name in ATTACKS:
        print(f"{name + ' AUC [95% CI]':>32}{'TPR@1%':>8}", end="")
    print()
    for r in rows:
        eps = r["epsilon_max"] if isinstance(r["epsilon_max"], str) else f"{r['epsilon_max']:.2f}"
        print(f"{r['run']:<5}{eps:>9}{_fmt(r['delta'], 'g') or '-':>8}{r['heldout_uar']:>7.3f}", end="")
        for name in ATTACKS:
            auc, lo, hi, tpr = (r[f"{name}_{k}"] for k in ("auc", "auc_lo", "auc_hi", "tpr1"))
            cell = "n/a" if auc is None else f"{auc:.3f} [{lo:.3f}, {hi:.3f}]"
            print(f"{cell:>32}{_fmt(tpr, '.2%') or 'n/a':>8}", end="")
        print()
    off, private = rows[0], rows[1:]
    best = {r["run"]: max(r[f"{n}_auc"] or 0.0 for n in ATTACKS) for r in rows}
    verdict = all(best[off["run"]] > best[p["run"]] for p in private)
    print(
        f"\nstrongest attack AUC: {', '.join(f'{k} {v:.3f}' for k, v in best.items())}; "
        f"non-private leaks more than every private run: {'yes' if verdict else 'NO'} "
        f"(members/non-members {off['n_members']}/{off['n_nonmembers']})"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
