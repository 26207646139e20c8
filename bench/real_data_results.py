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

    nice -n 19 .venv/bin/python bench/real_data_results.py [--only abcde] [--seeds 0 1 2] [--match ID]
    nice -n 19 .venv/bin/python bench/real_data_results.py --tables   # rewrite the tables only
"""

from __future__ import annotations

import argparse
import csv
import functools
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
    "uar_complete_test",
    "best_uar",
    "chance_uar",
    "epsilon_max",
    "noise_multiplier",
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
    ("4 local epochs", ["federation.local_epochs=4"]),
    ("batch 16", ["federation.batch_size=16"]),
    ("hidden 64", ["model.hidden=64"]),
    ("modality dropout 0.2", ["model.modality_dropout=0.2"]),
    ("60 rounds, 4 local epochs", ["federation.num_rounds=60", "federation.local_epochs=4"]),
]


#: data.standardize=federated: per-feature statistics from the clients' sums (DP under privacy=sample).
STD = ["data.standardize=federated"]
#: Per-clip functionals (mean and std over frames) per modality, concat fusion, standardised.
FUNC = ["model=functionals", *STD]


def standardised() -> list[Run]:
    """Group s: federated standardisation, alone (TCN) and with the per-clip functionals model."""
    face, speech = ["data.modalities=face"], ["data.modalities=speech"]
    out = [
        Run(
            "s",
            "RAVDESS 360 AV clips",
            "speech+face, TCN, standardised",
            "federated",
            "none",
            (*AV360, *STD, *OFF),
        )
    ]
    for dataset, setting, base in (
        ("RAVDESS 360 AV clips", "speech+face, functionals", [*AV360, *FUNC]),
        ("RAVDESS 360 AV clips", "face only, functionals", [*AV360, *face, *FUNC]),
        ("RAVDESS 360 AV clips", "speech only, functionals", [*AV360, *speech, *FUNC]),
        ("RAVDESS 1,440 clips", "speech+face (face on 1/4), functionals", [*AV, *FUNC]),
        ("RAVDESS 1,440 clips", "speech only, functionals", [*AUDIO, *FUNC]),
    ):
        out.append(Run("s", dataset, setting, "federated", "none", (*base, *OFF)))
        out.append(Run("s", dataset, setting, "centralised", "none", (*base, *OFF)))
        out.append(Run("s", dataset, setting, "federated", "eps 8", (*base, *DP8)))
        out.append(Run("s", dataset, setting, "federated", "eps 1", (*base, *DP1)))
    # Many samples per client: does the DP statistics release carry information there?
    for privacy, flags in (("none", OFF), ("eps 8", DP8)):
        out.append(
            Run("s", "Stress-Predict", "physio, standardised", "federated", privacy, (*STRESS, *STD, *flags))
        )
    # The clients' recipe (SGD lr 0.1, momentum 0.9) diverges when trained centrally for 60
    # epochs on the pooled 270 clips; the same model at lr 0.02, for a fair centralised row.
    lr = ["federation.lr=0.02"]
    out.append(
        Run(
            "s",
            "RAVDESS 360 AV clips",
            "speech+face, functionals, lr 0.02",
            "centralised",
            "none",
            (*AV360, *FUNC, *lr, *OFF),
        )
    )
    return out


def plan() -> list[Run]:
    """Every run, in priority order (groups a..e, then t, m, s)."""
    a = [
        Run("a", "RAVDESS 360 AV clips", "speech+face", "federated", "none", (*AV360, *OFF)),
        Run("a", "RAVDESS 360 AV clips", "speech+face", "centralised", "none", (*AV360, *OFF)),
        Run("a", "RAVDESS 360 AV clips", "face only", "federated", "none", (*FACE, *OFF)),
        Run(
            "a",
            "RAVDESS 360 AV clips",
            "speech only",
            "federated",
            "none",
            (*AV360, "data.modalities=speech", *OFF),
        ),
        Run("a", "RAVDESS 1,440 clips", "speech only", "federated", "none", (*AUDIO, *OFF)),
        Run("a", "RAVDESS 1,440 clips", "speech+face (face on 1/4)", "federated", "none", (*AV, *OFF)),
        Run("a", "RAVDESS 360 AV clips", "face only", "federated", "eps 8", (*FACE, *DP8)),
        Run("a", "RAVDESS 1,440 clips", "speech only", "federated", "eps 8", (*AUDIO, *DP8)),
        Run("a", "RAVDESS 1,440 clips", "speech+face (face on 1/4)", "federated", "eps 8", (*AV, *DP8)),
        Run("a", "RAVDESS 360 AV clips", "speech+face", "federated", "eps 8", (*AV360, *DP8)),
        Run("a", "RAVDESS 360 AV clips", "face only", "centralised", "none", (*FACE, *OFF)),
        Run("a", "RAVDESS 1,440 clips", "speech only", "centralised", "none", (*AUDIO, *OFF)),
    ]
    for setting, base in (
        ("speech+face", AV360),
        ("face only", FACE),
        ("speech only", [*AV360, "data.modalities=speech"]),
    ):
        a.append(Run("a", "RAVDESS 360 AV clips", setting, "logistic regression", "none", (*base, *OFF)))
        a.append(Run("a", "RAVDESS 360 AV clips", setting, "logistic regression, raw", "none", (*base, *OFF)))
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
    runs += standardised()
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
        "uar_complete_test": complete_test_uar(folder),
        "macro_f1": final["macro_f1"],
        "accuracy": final["accuracy"],
        "best_uar": s["best_uar"],
        "chance_uar": s["chance_uar"],
        "epsilon_max": final["epsilon_max"],
        "noise_multiplier": _noise_multipliers(folder),
        "delta": final["delta"],
        "accountant": final["accountant"],
        "unit": priv["unit"],
        "wall_s_under_load": s["wall_time_s"],
    }


def _noise_multipliers(folder: Path) -> str:
    """DP-SGD noise multipliers the clients used (from their ledgers' training rounds), e.g. "3.61"
    or "3.2-3.6", plus the feature-statistics release's (round 0) when the run made one."""
    sgd, release = set(), set()
    for ledger in sorted((folder / "ledgers").glob("client-*.json")):
        entries = json.loads(ledger.read_text())["entries"]
        for n, r in zip(entries["noise"], entries["round"], strict=True):
            (sgd if int(r) > 0 else release).add(round(float(n), 3))
    if not sgd and not release:
        return "0 (no DP)"
    text = "" if not sgd else f"{min(sgd):g}" if len(sgd) == 1 else f"{min(sgd):g}-{max(sgd):g}"
    if release:
        text += f" (statistics release {min(release):g})"
    return text


def complete_test_uar(folder: Path) -> float | str:
    """Final model's UAR on the held-out samples with every modality ("" if all or none have)."""
    import numpy as np

    from fedmer.run_artifacts import load_run, load_run_model
    from fedmer.train import evaluate_model

    run = load_run(folder)
    test = run.split().test
    complete = np.flatnonzero(test.mask.all(axis=1))
    if not 0 < len(complete) < len(test):
        return ""
    return evaluate_model(load_run_model(run), test.subset(complete))["uar"]


def compose_experiment(overrides: list[str], folder: Path):
    """The validated ExperimentConfig of Hydra ``overrides`` (as ``simulations.run`` composes it)."""
    from hydra import compose, initialize_config_dir

    from simulations.run import CONFIG_DIR, experiment_from_hydra

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR), job_name="real_data"):
        return experiment_from_hydra(
            compose(config_name="config", overrides=[*overrides, f"output.dir='{folder}'"])
        )


#: The privacy columns of a row trained without DP (reference and centralised runs).
NO_DP = {
    "epsilon_max": "inf",
    "noise_multiplier": "0 (no DP)",
    "delta": "",
    "accountant": "",
    "unit": "none (no DP)",
}


def run_logistic_reference(run: Run, seed: int, folder: Path) -> dict:
    """bench/ravdess_reference.py's L2 softmax regression (l2 0.01) on this run's own split.

    Per clip: speech = mean and std over its frames, face = its 56 numbers (frame 0);
    standardised on the training clips (``logistic regression``) or not (``..., raw``, a
    diagnostic). Same held-out actors as the federated runs.
    """
    out = folder / "reference.json"
    if not out.exists():
        import numpy as np
        import torch

        from fedmer.data.registry import load_split
        from fedmer.metrics import classification_report

        sys.path.insert(0, str(ROOT / "bench"))
        from ravdess_reference import fit_predict

        torch.set_num_threads(1)
        split = load_split(compose_experiment([*run.overrides, f"seed={seed}"], folder))

        def features(data) -> np.ndarray:
            cols = []
            for name, (a, b) in zip(data.modalities, data.feature_slices, strict=True):
                x = data.x[:, :, a:b]
                cols += [x[:, 0]] if name == "face" else [x.mean(axis=1), x.std(axis=1)]
            return np.concatenate(cols, axis=1)

        k = split.test.num_classes
        xtr, xte = features(split.train), features(split.test)
        fit = functools.partial(fit_predict, standardise=not run.training.endswith("raw"))
        pred = fit(xtr, split.train.y, xte, 1e-2, k)
        report = classification_report(split.test.y, pred, k)
        report.update(chance_uar=1.0 / k, train_samples=len(split.train), test_samples=len(split.test))
        out.write_text(json.dumps(report, indent=1))
    r = json.loads(out.read_text())
    return {
        "uar": r["uar"],
        "uar_last5": r["uar"],
        "uar_complete_test": "",
        "macro_f1": r["macro_f1"],
        "accuracy": r["accuracy"],
        "best_uar": r["uar"],
        "chance_uar": r["chance_uar"],
        **NO_DP,
        "budget": "L-BFGS to convergence, l2 0.01 (bench/ravdess_reference.py)",
        "wall_s_under_load": "",
    }


def run_centralised(run: Run, seed: int, folder: Path) -> dict:
    """The same model without federation or DP on the pooled client data."""
    out = folder / "centralized.json"
    if not out.exists():
        import torch

        from fedmer.centralized import default_epochs, train_centralized

        exp = compose_experiment([*run.overrides, f"seed={seed}"], folder)
        torch.set_num_threads(1)  # as each simulated client does
        log.info("centralised: %s (%d epochs)", " ".join(run.overrides), default_epochs(exp))
        result = train_centralized(exp)
        out.write_text(json.dumps(result, indent=1))
    r = json.loads(out.read_text())
    last5 = [point["uar"] for point in r["curve"]][-5:]
    return {
        "uar": r["uar"],
        "uar_last5": sum(last5) / len(last5),
        "uar_complete_test": "" if r.get("complete_uar") is None else r["complete_uar"],
        "macro_f1": r["macro_f1"],
        "accuracy": r["accuracy"],
        "best_uar": r["best_uar"],
        "chance_uar": r["chance_uar"],
        **NO_DP,
        "budget": f"{r['epochs']} epochs on {r['train_samples']} pooled samples",
        "wall_s_under_load": round(r["wall_s"], 1),
    }


def _fmt(value: float | str) -> str:
    return "" if value == "" else f"{float(value):.3f}"


def _mean_sd(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {sd:.3f}"


#: The columns of the summary table: (training, privacy) -> header.
PIVOT = {
    ("centralised", "none"): "centralised, no DP",
    ("federated", "none"): "federated, no DP",
    ("federated", "eps 8"): "federated, DP ε=8",
    ("federated", "eps 1"): "federated, DP ε=1",
}


def _pivot(rows: list[dict]) -> list[str]:
    """Held-out UAR (mean ± sd over seeds [n]) per dataset setting, one column per training mode."""
    cells: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in rows:
        column = PIVOT.get((r["training"], r["privacy"]))
        if column is not None and r["group"] in "abcdes":
            cells.setdefault((r["dataset"], r["setting"]), {}).setdefault(column, []).append(float(r["uar"]))
    out = [
        "| dataset | setting | " + " | ".join(PIVOT.values()) + " |",
        "|---|---|" + "---|" * len(PIVOT),
    ]
    for (dataset, setting), by_col in cells.items():
        values = [f"{_mean_sd(v)} [{len(v)}]" if (v := by_col.get(c)) else "" for c in PIVOT.values()]
        out.append(f"| {dataset} | {setting} | " + " | ".join(values) + " |")
    return out


def write_tables(rows: list[dict]) -> None:
    """CSV of every (run, seed) row; Markdown: one line per run, mean ± sd over its seeds."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "real_data_results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| group | dataset | setting | training | DP | seeds | UAR | UAR last 5 | UAR, all-modality test "
        "clips | macro-F1 | acc | chance | max ε (δ) | noise σ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_run: dict[str, list[dict]] = {}
    for r in rows:
        by_run.setdefault(r["run_dir"].rsplit("-seed", 1)[0], []).append(r)
    for same in by_run.values():
        r = same[0]
        eps = max(float(x["epsilon_max"]) for x in same)
        eps_txt = "∞" if eps == float("inf") else f"{eps:.2f} ({r['delta']})"
        complete = [float(x["uar_complete_test"]) for x in same if x["uar_complete_test"] != ""]
        cells = [
            r["group"],
            r["dataset"],
            r["setting"],
            r["training"],
            r["privacy"],
            ",".join(str(x["seed"]) for x in same),
            *(_mean_sd([float(x[key]) for x in same]) for key in ("uar", "uar_last5")),
            _mean_sd(complete) if complete else "",
            *(_mean_sd([float(x[key]) for x in same]) for key in ("macro_f1", "accuracy")),
            f"{float(r['chance_uar']):.3f}",
            eps_txt,
            "; ".join(sorted({str(x["noise_multiplier"]) for x in same})),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_pivot(rows)]
    (RESULTS / "real_data_results.md").write_text("\n".join(lines) + "\n")


def measure(run: Run, seed: int, execute: bool) -> dict | None:
    """The CSV row of ``run``: measured now if ``execute``, else read back (None if never run)."""
    folder = RUNS_DIR / f"{run.run_id}-seed{seed}"
    result_file = folder / {"federated": "summary.json", "centralised": "centralized.json"}.get(
        run.training, "reference.json"
    )
    if not execute and not result_file.exists():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    if run.training == "federated":
        measured = run_federated(run, seed, folder)
        measured["budget"] = "see overrides: num_rounds x local_epochs per client"
    elif run.training == "centralised":
        measured = run_centralised(run, seed, folder)
    else:
        measured = run_logistic_reference(run, seed, folder)
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


def collect() -> list[dict]:
    """Rows of every planned run and seed with a result on disk (whatever invocation measured it)."""
    rows = []
    for run in plan():
        seeds = sorted(
            int(p.name.rsplit("-seed", 1)[1]) for p in RUNS_DIR.glob(f"{run.run_id}-seed*") if p.is_dir()
        )
        rows += [row for seed in seeds if (row := measure(run, seed, execute=False)) is not None]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="abcde", help="groups to run, e.g. 'ab' (default abcde)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to run (default 0)")
    parser.add_argument("--match", default="", help="only runs whose id contains this (e.g. 360-av)")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument("--tables", action="store_true", help="only rewrite the tables from runs on disk")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.tables:
        write_tables(collect())
        return
    runs = [r for r in plan() if r.group in args.only and args.match in r.run_id]
    if args.list:
        for r in runs:
            print(r.group, r.run_id, " ".join(r.overrides))
        return
    for i, run in enumerate(runs, start=1):
        for seed in args.seeds:
            start = time.perf_counter()
            print(f"[{i}/{len(runs)}] {run.group} {run.run_id} seed {seed}", flush=True)
            try:
                row = measure(run, seed, execute=True)
            except subprocess.CalledProcessError as err:
                print(f"    FAILED ({err}); see outputs/real_data/{run.run_id}-seed{seed}.log", flush=True)
                continue
            write_tables(collect())
            print(
                f"    UAR {row['uar']:.3f}  macro-F1 {row['macro_f1']:.3f}  acc {row['accuracy']:.3f}  "
                f"eps {row['epsilon_max']}  ({time.perf_counter() - start:.0f} s under load)",
                flush=True,
            )


if __name__ == "__main__":
    main()
