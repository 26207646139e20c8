"""A user's first run on a fresh machine: every privacy noise search cold, against another revision.

``python -m simulations.run federation.num_rounds=R`` (the default run, shortened), each time
with an empty ``FEDMER_CACHE_DIR``, so every Ray actor searches its noise as on a fresh clone
(the synthetic data needs no feature cache). With ``--ref REV`` the same run of that git
revision (checked out with ``git worktree`` into a temporary folder, run with this checkout's
``.venv``) alternates with this checkout's, ``--repeats`` times each; the table gives launch to
exit, the final held-out UAR and epsilon, and how many noise answers each run stored.

    .venv/bin/python -m bench.first_run --ref 5f1727d^    # before session 12's noise search
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "first_run.json"


def _one_run(root: Path, rounds: int) -> dict[str, Any]:
    cache = Path(tempfile.mkdtemp(prefix="fedmer_cold_cache_"))
    out = Path(tempfile.mkdtemp(prefix="fedmer_cold_run_"))
    try:
        cmd = [
            sys.executable,
            "-m",
            "simulations.run",
            f"federation.num_rounds={rounds}",
            f"hydra.run.dir={out}",
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=root, env={**os.environ, "FEDMER_CACHE_DIR": str(cache)}, capture_output=True, text=True
        )
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"the run in {root} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        last = json.loads((out / "rounds.jsonl").read_text().splitlines()[-1])
        noise = cache / "noise"
        stored = len(list(noise.iterdir())) if noise.is_dir() else 0
        privacy = {k: last[k] for k in ("delta", "accountant", "privacy_unit")}
        measured = {"s": seconds, "uar": last["uar"], "epsilon_max": last["epsilon_max"]}
        return {**measured, **privacy, "noise_answers": stored}
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", help="a git revision to compare against (run from a temporary worktree)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    given = list(argv) if argv is not None else sys.argv[1:]
    args = parser.parse_args(given)
    roots = {"this checkout": ROOT}
    worktree = None
    if args.ref:
        worktree = Path(tempfile.mkdtemp(prefix="fedmer_ref_")) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.ref], cwd=ROOT, check=True)
        roots[args.ref] = worktree
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in roots}
    try:
        for rep in range(args.repeats):
            order = list(roots) if rep % 2 == 0 else list(reversed(roots))
            for name in order:
                run = _one_run(roots[name], args.rounds)
                runs[name].append(run)
                print(
                    f"{name:<16} {run['s']:6.1f} s  UAR {run['uar']:.4f}  "
                    f"max client epsilon {run['epsilon_max']:.4f} "
                    f"(delta {run['delta']:g}, {run['accountant']}, per {run['privacy_unit']})  "
                    f"noise answers stored {run['noise_answers']}",
                    flush=True,
                )
    finally:
        if worktree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False)
    print(f"\nlaunch to exit, empty caches, {args.rounds} rounds, medians of {args.repeats}:")
    for name, rs in runs.items():
        each = ", ".join(f"{r['s']:.1f}" for r in rs)
        print(f"{name:<16} {statistics.median(r['s'] for r in rs):6.1f} s  (runs: {each})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": " ".join(["python -m bench.first_run", *given]),
        "rounds": args.rounds,
        "runs": runs,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
