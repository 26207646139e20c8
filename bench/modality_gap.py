"""Does fusion beat the best single modality? Measured with the real federated DP pipeline.

Runs the default experiment (10 clients, DP-SGD at the default target epsilon) once per
single modality and once with all modalities, and prints / writes the held-out-person
UAR of each (the same Flower simulation as `make run`, only `data.modalities` differs).

    .venv/bin/python bench/modality_gap.py [hydra overrides...]   # e.g. data=clinic

Writes bench/results/modality_gap_<scenario>.csv and .png.
"""

from __future__ import annotations

import csv
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedmer.config import MODALITIES
from simulations.compose import compose_experiment
from simulations.run import run

ROOT = Path(__file__).resolve().parents[1]


def main(overrides: list[str]) -> None:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for choice in (*MODALITIES, "all"):
            exp = compose_experiment([*overrides, f"data.modalities={choice}"], f"{tmp}/{choice}")
            if exp.data.scenario == "clinic" and choice == "can":
                continue  # no vehicle telemetry in hospitals
            t0 = time.monotonic()
            summary = run(exp)
            final, chance = summary["final"], summary["chance_uar"]
            results.append((choice, final["uar"], final["epsilon_max"], time.monotonic() - t0))
            print(f"{choice:8s} UAR {final['uar']:.4f}  max eps {final['epsilon_max']:.3f}", flush=True)
    scenario = exp.data.scenario
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"modality_gap_{scenario}.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["modalities", "uar", "epsilon_max", "delta", "seconds"])
        for name, uar, eps, secs in results:
            writer.writerow([name, f"{uar:.4f}", f"{eps:.4f}", exp.privacy.delta, f"{secs:.1f}"])
    best_single = max((r for r in results if r[0] != "all"), key=lambda r: r[1])
    fused = next(r for r in results if r[0] == "all")
    print(
        f"\n{scenario}: best single modality {best_single[0]} UAR {best_single[1]:.4f}; "
        f"fusion UAR {fused[1]:.4f}; gap {100 * (fused[1] - best_single[1]):.1f} points "
        f"(chance {chance:.2f}; DP per sample, delta={exp.privacy.delta:g}, {exp.privacy.accountant})"
    )
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    names = [r[0] for r in results]
    ax.bar(names, [r[1] for r in results], color=["#888"] * (len(names) - 1) + ["#1f77b4"])
    ax.axhline(chance, linestyle=":", color="grey", label="chance")
    ax.set_ylabel("held-out UAR")
    ax.set_title(f"{scenario}: single modalities vs fusion (federated, DP)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"modality_gap_{scenario}.png")


if __name__ == "__main__":
    main(sys.argv[1:])
