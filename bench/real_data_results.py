"""Held-out-person results on the real datasets: centralised vs federated, with and without DP.

For each dataset setting the same model is trained

* centralised: no federation, no DP, on the union of the clients' training partitions, for
  ``num_rounds x local_epochs`` epochs (``fedmer.centralized.train_centralized``), and
* federated: real Flower simulations (``python -m simulations.run`` in a subprocess) without DP
  (``privacy=off``: updates still clipped to C, no noise) and with sample-level DP-SGD at
  epsilon 8 and 1 (delta 1e-5, RDP accountant, noise derived for the whole run),

and scored on the same held-out test persons (``load_split(cfg).test``, what the server
evaluates). Groups, in the order they run (``--only`` picks some):

* ``a``: RAVDESS single modality vs fusion (speech only on all 1,440 clips, face only and
  speech+face on the 360 audio-visual clips, speech+face on all clips with the natural
  missing face), federated without DP and at epsilon 8, plus the 360-clip centralised run
  (compare with ``bench/ravdess_reference.py``);
* ``b``: RAVDESS speech+face (``+experiment=ravdess_av``), the four settings;
* ``c``: Stress-Predict (``data=stress_predict``, default federation), the four settings;
* ``d``: MELD with MiniLM sentence vectors (``+experiment=meld data.text_encoder=minilm``);
* ``e``: RAVDESS audio only (``+experiment=ravdess_audio``);
* ``t``: tuning of the 360-clip federated fusion model without DP (every tried setting);
* ``m``: MELD with hashed tokens (``+experiment=meld``).

Each run's folder is ``outputs/real_data/<run id>/`` (``summary.json`` for a federated run,
``centralized.json`` for a centralised one); a run whose result file exists is not repeated,
so the script resumes where it stopped. Results go to ``bench/results/real_data_results.csv``
and ``bench/results/real_data_results.md``.

    nice -n 19 .venv/bin/python bench/real_data_results.py [--only abcde] [--seed 0] [--list]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("real_data_results")
RUNS_DIR = ROOT / "outputs" / "real_data"
RESULTS = ROOT / "bench" / "results"
FIELDS = [
    "group",
    "dataset",
    "setting",
    "training",
    "privacy",
    "uar",
    "macro_f1",
    "accuracy",
    "uar_last5",
    "best_uar",
    "chance_uar",
    "epsilon_max",
    "delta",
    "accountant",
    "unit",
    "budget",
    "seed",
    "overrides",
    "run_dir",
    "wall_s_under_load",
]

#: Sample-level DP settings (the default privacy group of the RAVDESS experiments is sample).
OFF = ["privacy=off"]
DP8 = ["privacy=sample", "privacy.target_epsilon=8"]
DP1 = ["privacy=sample", "privacy.target_epsilon=1"]


@dataclass(frozen=True)
class Run:
    """One measurement: a federated simulation or its centralised counterpart."""

    group: str
    dataset: str
    setting: str
    training: str  # "centralised" | "federated"
    privacy: str  # "none" | "eps 8" | "eps 1"
    overrides: tuple[str, ...]

    @property
    def run_id(self) -> str:
        key = "_".join((self.dataset, self.setting, self.training, self.privacy))
        return "".join(c if c.isalnum() else "-" for c in key.lower())


def four(group: str, dataset: str, setting: str, base: list[str]) -> list[Run]:
    """Centralised, federated without DP, federated DP eps 8, federated DP eps 1."""
    return [
        Run(group, dataset, setting, "centralised", "none", (*base, *OFF)),
        Run(group, dataset, setting, "federated", "none", (*base, *OFF)),
        Run(group, dataset, setting, "federated", "eps 8", (*base, *DP8)),
        Run(group, dataset, setting, "federated", "eps 1", (*base, *DP1)),
    ]


AV = ["+experiment=ravdess_av"]
AV360 = [*AV, "data.complete_only=true"]
AUDIO = ["+experiment=ravdess_audio"]
FACE = [*AV, "data.modalities=face", "data.complete_only=true"]
STRESS = ["data=stress_predict"]
MELD_MINILM = ["+experiment=meld", "data.text_encoder=minilm"]
MELD_TOKENS = ["+experiment=meld"]

#: Tuning of the 360-clip fusion model without DP: every setting tried is listed (and reported).
TUNING = [
    ("concat fusion", ["model=concat"]),
    ("lr 0.05", ["federation.lr=0.05"]),
    ("60 rounds", ["federation.num_rounds=60"]),
    ("hidden 64", ["model.hidden=64"]),
    ("modality dropout 0.2", ["model.modality_dropout=0.2"]),
]


def plan() -> list[Run]:
    """Every run, in priority order (groups a..e, then t, m)."""
    a = [
        Run("a", "RAVDESS 360 AV clips", "speech+face", "federated", "none", (*AV360, *OFF)),
        Run("a", "RAVDESS 360 AV clips", "speech+face", "centralised", "none", (*AV360, *OFF)),
        Run("a", "RAVDESS 360 AV clips", "face only", "federated", "none", (*FACE, *OFF)),
        Run("a", "RAVDESS 1,440 clips", "speech only", "federated", "none", (*AUDIO, *OFF)),
        Run("a", "RAVDESS 1,440 clips", "speech+face (face on 1/4)", "federated", "none", (*AV, *OFF)),
        Run("a", "RAVDESS 360 AV clips", "face only", "federated", "eps 8", (*FACE, *DP8)),
        Run("a", "RAVDESS 1,440 clips", "speech only", "federated", "eps 8", (*AUDIO, *DP8)),
        Run("a", "RAVDESS 1,440 clips", "speech+face (face on 1/4)", "federated", "eps 8", (*AV, *DP8)),
        Run("a", "RAVDESS 360 AV clips", "speech+face", "federated", "eps 8", (*AV360, *DP8)),
        Run("a", "RAVDESS 360 AV clips", "face only", "centralised", "none", (*FACE, *OFF)),
        Run("a", "RAVDESS 1,440 clips", "speech only", "centralised", "none", (*AUDIO, *OFF)),
    ]
    runs = a
    runs += four("b", "RAVDESS 1,440 clips", "speech+face (face on 1/4)", AV)
    runs += four("c", "Stress-Predict", "physio", STRESS)
    runs += four("d", "MELD", "text, MiniLM vectors", MELD_MINILM)
    runs += four("e", "RAVDESS 1,440 clips", "speech only", AUDIO)
    for name, extra in TUNING:
        runs.append(
            Run(
                "t",
                "RAVDESS 360 AV clips",
                f"speech+face, {name}",
                "federated",
                "none",
                (*AV360, *extra, *OFF),
            )
        )
    runs += four("m", "MELD", "text, hashed tokens", MELD_TOKENS)
    unique: dict[str, Run] = {}
    for run in runs:  # a run shared by two groups (e.g. a and b) is measured once, listed first
        unique.setdefault(run.run_id, run)
    return list(unique.values())


def run_federated(run: Run, seed: int, folder: Path) -> dict:
    """One Flower simulation in a subprocess; its summary.json."""
    summary = folder / "summary.json"
    if not summary.exists():
        cmd = [
            sys.executable,
            "-m",
            "simulations.run",
            *run.overrides,
            f"seed={seed}",
            f"hydra.run.dir={folder}",
        ]
        log.info("running: %s", " ".join(cmd))
        with open(folder.parent / f"{folder.name}.log", "w") as out:
            subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=True)
    s = json.loads(summary.read_text())
    final, priv = s["final"], s["privacy"]
    rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines() if line.strip()]
    last5 = [r["uar"] for r in rounds if r["round"] > 0][-5:]
    return {
        "uar": final["uar"],
        "uar_last5": sum(last5) / len(last5),
        "macro_f1": final["macro_f1"],
        "accuracy": final["accuracy"],
        "best_uar": s["best_uar"],
        "chance_uar": s["chance_uar"],
        "epsilon_max": final["epsilon_max"],
        "delta": final["delta"],
        "accountant": final["accountant"],
        "unit": priv["unit"],
        "wall_s_under_load": s["wall_time_s"],
    }


def run_centralised(run: Run, seed: int, folder: Path) -> dict:
    """The same model without federation or DP on the pooled client data."""
    out = folder / "centralized.json"
    if not out.exists():
        import torch
        from hydra import compose, initialize_config_dir

        from fedmer.centralized import default_epochs, train_centralized
        from simulations.run import CONFIG_DIR, experiment_from_hydra

        overrides = [*run.overrides, f"seed={seed}", f"output.dir='{folder}'"]
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR), job_name="centralised"):
            exp = experiment_from_hydra(compose(config_name="config", overrides=overrides))
        torch.set_num_threads(1)  # as each simulated client does
        log.info("centralised: %s (%d epochs)", " ".join(run.overrides), default_epochs(exp))
        result = train_centralized(exp)
        out.write_text(json.dumps(result, indent=1))
    r = json.loads(out.read_text())
    last5 = [point["uar"] for point in r["curve"]][-5:]
    return {
        "uar": r["uar"],
        "uar_last5": sum(last5) / len(last5),
        "macro_f1": r["macro_f1"],
        "accuracy": r["accuracy"],
        "best_uar": r["best_uar"],
        "chance_uar": r["chance_uar"],
        "epsilon_max": "inf",
        "delta": "",
        "accountant": "",
        "unit": "none (no DP)",
        "budget": f"{r['epochs']} epochs on {r['train_samples']} pooled samples",
        "wall_s_under_load": round(r["wall_s"], 1),
    }


def write_tables(rows: list[dict]) -> None:
    """CSV of every row and a Markdown table per group."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "real_data_results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| group | dataset | setting | training | DP | UAR | macro-F1 | acc | best UAR | chance | max ε (δ) |"
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        eps = r["epsilon_max"]
        eps_txt = "∞" if eps in ("inf", float("inf")) else f"{float(eps):.2f} ({r['delta']})"
        lines.append(
            f"| {r['group']} | {r['dataset']} | {r['setting']} | {r['training']} | {r['privacy']} "
            f"| {float(r['uar']):.3f} | {float(r['uar_last5']):.3f} | {float(r['macro_f1']):.3f} "
            f"| {float(r['accuracy']):.3f} "
            f"| {float(r['best_uar']):.3f} | {float(r['chance_uar']):.3f} | {eps_txt} |"
        )
    (RESULTS / "real_data_results.md").write_text("\n".join(lines) + "\n")


def measure(run: Run, seed: int, execute: bool) -> dict | None:
    """The CSV row of ``run``: measured now if ``execute``, else read back (None if never run)."""
    folder = RUNS_DIR / f"{run.run_id}-seed{seed}"
    result_file = folder / ("summary.json" if run.training == "federated" else "centralized.json")
    if not execute and not result_file.exists():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    if run.training == "federated":
        measured = run_federated(run, seed, folder)
        measured["budget"] = "see overrides: num_rounds x local_epochs per client"
    else:
        measured = run_centralised(run, seed, folder)
    return {
        "group": run.group,
        "dataset": run.dataset,
        "setting": run.setting,
        "training": run.training,
        "privacy": run.privacy,
        "seed": seed,
        "overrides": " ".join(run.overrides),
        "run_dir": str(folder.relative_to(ROOT)),
        **measured,
    }


def collect(seed: int) -> list[dict]:
    """Rows of every planned run that has a result on disk (whatever invocation measured it)."""
    return [row for run in plan() if (row := measure(run, seed, execute=False)) is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="abcde", help="groups to run, e.g. 'ab' (default abcde)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument("--tables", action="store_true", help="only rewrite the tables from runs on disk")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.tables:
        write_tables(collect(args.seed))
        return
    runs = [r for r in plan() if r.group in args.only]
    if args.list:
        for r in runs:
            print(r.group, r.run_id, " ".join(r.overrides))
        return
    for i, run in enumerate(runs, start=1):
        start = time.perf_counter()
        print(f"[{i}/{len(runs)}] {run.group} {run.run_id}", flush=True)
        try:
            row = measure(run, args.seed, execute=True)
        except subprocess.CalledProcessError as err:
            print(f"    FAILED ({err}); see outputs/real_data/{run.run_id}-seed{args.seed}.log", flush=True)
            continue
        write_tables(collect(args.seed))
        print(
            f"    UAR {row['uar']:.3f}  macro-F1 {row['macro_f1']:.3f}  acc {row['accuracy']:.3f}  "
            f"eps {row['epsilon_max']}  ({time.perf_counter() - start:.0f} s under load)",
            flush=True,
        )


if __name__ == "__main__":
    main()
