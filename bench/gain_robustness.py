"""Gain robustness and eGeMAPS layout of the RAVDESS speech front-ends (docs/ravdess.md, "eGeMAPS").

Every variant's features are computed once for the 360 audio-visual clips at 0 dB, -20 dB and
+10 dB (waveform scaled, clipped at +-1), then for each seed a small centralised model (the
speech-only 360-clip experiment, ``model=functionals``, exact standardisation, SGD lr 0.02,
60 epochs) is trained at 0 dB and scored on the held-out actors at each gain
(``fedmer.training.gain``). Variants: the numpy log-mel front-end (no level normalisation),
eGeMAPS without and with per-utterance level normalisation, and eGeMAPS' 88 functionals alone.

    nice -n 19 .venv/bin/python -m bench.gain_robustness [--seeds 0 1 2] [--variants logmel egemaps]
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path

import numpy as np

from fedmer.data.audio_features import AudioFrontEnd, SpeechFrontEnd
from fedmer.data.egemaps import EgemapsFrontEnd
from fedmer.training.gain import clip_paths, gain_robustness, replay_all
from simulations.compose import compose_experiment

log = logging.getLogger("gain_robustness")
CSV_PATH = Path(__file__).resolve().parent / "results" / "gain_robustness.csv"
OVERRIDES = [
    "+experiment=ravdess_audio",
    "data.complete_only=true",
    "model=functionals",
    "data.standardize=federated",
]
GAINS = (-20.0, 10.0)
VARIANTS: dict[str, SpeechFrontEnd] = {
    "logmel": AudioFrontEnd("logmel", 20),
    "logmel-level-norm": AudioFrontEnd("logmel", 20, level_norm=True),
    "egemaps-no-level-norm": EgemapsFrontEnd(20, level_norm=False),
    "egemaps": EgemapsFrontEnd(20),
    "egemaps-functionals-only": EgemapsFrontEnd(20, layout="functionals"),
}


def main() -> None:
    """Run the variants and seeds; print and write one row per (variant, seed)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = []
    for name in args.variants:
        start = time.perf_counter()
        cfg0 = compose_experiment([*OVERRIDES, "seed=0"])
        feats, clipped = replay_all(VARIANTS[name], clip_paths(cfg0), GAINS)
        log.info("%s: features at %s dB in %.0f s", name, (0, *GAINS), time.perf_counter() - start)
        for seed in args.seeds:
            cfg = compose_experiment([*OVERRIDES, f"seed={seed}"])
            r = gain_robustness(cfg, GAINS, replayed=feats)
            uar, agree = r["uar"], r["agreement"]
            assert isinstance(uar, dict) and isinstance(agree, dict)
            row = {"variant": name, "seed": seed, "n_test": r["n_test"], "uar_0db": round(uar[0.0], 4)}
            for g in GAINS:
                row[f"uar_{g:+.0f}db"] = round(uar[g], 4)
                row[f"agree_{g:+.0f}db"] = round(agree[g], 4)
                row[f"clipped_{g:+.0f}db_of_360"] = clipped[g]
            rows.append(row)
            print(row, flush=True)
    done = {(r["variant"], r["seed"]) for r in rows}
    if CSV_PATH.is_file():  # keep the other variants' and seeds' rows of earlier invocations
        with CSV_PATH.open(newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if (r["variant"], int(r["seed"])) not in done] + rows
    CSV_PATH.parent.mkdir(parents=True, exist_ok=True)
    with CSV_PATH.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        cells = []
        for k in (k for k in mine[0] if k.startswith(("uar", "agree"))):
            values = [float(r[k]) for r in mine]
            cells.append(f"{k} {np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}")
        print(f"{name} [{len(mine)} seeds]: " + ", ".join(cells))


if __name__ == "__main__":
    main()
