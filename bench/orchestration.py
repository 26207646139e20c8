"""Orchestration efficiency and start-up: how much of a simulation's wall time is client work.

The yardstick is the same run executed in this process, one thread, with the ClientApp called
directly (``simulations/sequential.py``): every client call is timed; with 2 cores the ideal
round is the client work divided by 2 plus what the server does (sampling, aggregation,
evaluation, writing files). The real run is ``python -m simulations.run`` (Flower's Ray
runtime) with the same overrides, its rounds timed as they land in ``rounds.jsonl``.

    .venv/bin/python -m bench.orchestration                      # the default run (10 x 20)
    .venv/bin/python -m bench.orchestration --rounds 8 --flower-default
    .venv/bin/python -m bench.orchestration --flower-start --repeats 3   # early Ray start or Flower's

Printed: ideal and actual seconds per steady round (median over rounds 2..R), their ratio
(efficiency, target >= 0.95), the whole run's ratio (ideal total over launch-to-exit, target
>= 0.85), start-up (launch to the end of round 1 minus one steady round, target <= 10 s),
and whether the final metrics of both are identical. ``--flower-default`` adds the run with
Flower's default client resources (2 CPUs per client: one client at a time on 2 cores);
``--flower-start`` the run with Ray and its actors started by Flower's runtime after the driver's
set-up (``FEDMER_REUSE_RAY=0``) instead of early (``simulations/ray_start.py``); ``--repeats``
runs each variant that many times, interleaved, each repeat after its own in-process ideal
(the ratio of each run is to the ideal measured just before it), and reports medians.
Results: bench/results/orchestration.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "orchestration.json"
CORES = 2


def _ideal(overrides: list[str], out: Path) -> dict[str, Any]:
    """The run in this process, one thread; per round: wall, client seconds, ideal 2-core seconds."""
    import torch

    from client.app import app as client_app
    from server.app import run_server
    from simulations.compose import compose_experiment
    from simulations.sequential import SequentialGrid

    torch.set_num_threads(1)
    cfg = compose_experiment(overrides, output_dir=out)
    grid = SequentialGrid(client_app, cfg.federation.num_clients, cfg.to_run_config())
    starts: list[tuple[float, int]] = []  # (time, index into grid.calls) at each train batch
    inner = grid.push_messages  # the server's grid pushes, then pulls (PartitionOrderedGrid)

    def stamped(messages):  # type: ignore[no-untyped-def]
        messages = list(messages)
        if messages and messages[0].metadata.message_type.startswith("train"):
            starts.append((time.perf_counter(), len(grid.calls)))
        return inner(messages)

    grid.push_messages = stamped  # type: ignore[method-assign]
    t0 = time.perf_counter()
    summary = run_server(grid, cfg)
    t_end = time.perf_counter()
    bounds = [*starts, (t_end, len(grid.calls))]
    rounds = []
    for (ta, ia), (tb, ib) in itertools.pairwise(bounds):
        client = sum(s for _, s in grid.calls[ia:ib])
        wall = tb - ta
        rounds.append({"wall_s": wall, "client_s": client, "ideal_s": wall - client + client / CORES})
    setup = starts[0][0] - t0 if starts else t_end - t0  # data, model, initial evaluation
    return {"rounds": rounds, "setup_s": setup, "final": summary["final"]}


def _actual(overrides: list[str], out: Path, env: dict[str, str]) -> dict[str, Any]:
    """``python -m simulations.run`` as a user starts it; when each round's row lands, and the exit."""
    cmd = [sys.executable, "-m", "simulations.run", *overrides, f"hydra.run.dir={out}"]
    landed: list[float] = []
    done = threading.Event()

    def watch() -> None:
        path = out / "rounds.jsonl"
        while not done.is_set():
            if path.exists():
                n = len(path.read_text().splitlines())
                while len(landed) < n:
                    landed.append(time.perf_counter())
            time.sleep(0.02)

    t0 = time.perf_counter()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
    t_exit = time.perf_counter()
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"the run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    stamps = [t - t0 for t in landed[: len(rows)]]
    return {"row_s": stamps, "exit_s": t_exit - t0, "final": rows[-1]}


def _compare(ideal: dict[str, Any], actual: dict[str, Any]) -> dict[str, Any]:
    steady_ideal = statistics.median(r["ideal_s"] for r in ideal["rounds"][1:])
    gaps = [b - a for a, b in itertools.pairwise(actual["row_s"][1:])]
    steady_actual = statistics.median(gaps)
    ideal_total = ideal["setup_s"] + sum(r["ideal_s"] for r in ideal["rounds"])
    keys = ("uar", "accuracy", "loss", "epsilon_max")
    return {
        "steady_round_ideal_s": round(steady_ideal, 3),
        "steady_round_actual_s": round(steady_actual, 3),
        "steady_efficiency": round(steady_ideal / steady_actual, 3),
        "whole_run_ideal_s": round(ideal_total, 2),
        "whole_run_actual_s": round(actual["exit_s"], 2),
        "whole_run_efficiency": round(ideal_total / actual["exit_s"], 3),
        "launch_to_round_1_s": round(actual["row_s"][1], 2),
        "startup_s": round(actual["row_s"][1] - steady_actual, 2),
        "identical_metrics": all(ideal["final"][k] == actual["final"][k] for k in keys),
    }


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over repeated runs (each run's own figures kept under ``runs``)."""
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, bool):
            out[key] = all(r[key] for r in runs)
        else:
            out[key] = round(statistics.median(r[key] for r in runs), 3)
    return {**out, "runs": runs} if len(runs) > 1 else out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="federation.num_rounds (default run: 20)")
    parser.add_argument("--flower-default", action="store_true", help="also Flower's default resources")
    parser.add_argument(
        "--flower-start",
        action="store_true",
        help="also the run with Ray and its actors started by Flower's runtime (FEDMER_REUSE_RAY=0)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant, interleaved (medians)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs")
    args = parser.parse_args()
    overrides = [f"federation.num_rounds={args.rounds}", *args.overrides]
    report: dict[str, Any] = {"overrides": overrides, "cores": os.cpu_count(), "repeats": args.repeats}
    variants: dict[str, tuple[list[str], dict[str, str]]] = {"fedmer (1 CPU per client)": ([], {})}
    if args.flower_start:
        variants["fedmer, Flower's start of Ray"] = ([], {"FEDMER_REUSE_RAY": "0"})
    if args.flower_default:
        variants["flower default (2 CPUs per client)"] = (["federation.client_cpus=2"], {})
    with tempfile.TemporaryDirectory(prefix="fedmer-orch-") as tmp:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
        ideal_setups = []
        for i in range(args.repeats):
            # the yardstick is measured again before each repeat: the machine's speed drifts
            # over minutes, and each actual run is compared with the ideal of its own repeat
            print(f"ideal {i + 1}/{args.repeats}: the same run in this process, one thread ...", flush=True)
            ideal = _ideal(overrides, Path(tmp) / f"ideal{i}")
            ideal_setups.append(ideal["setup_s"])
            # a later repeat finds this process's caches warm (set-up ~0.04 s instead of ~1 s);
            # a fresh run pays the cold set-up, so every repeat's whole-run ideal counts the first
            ideal["setup_s"] = ideal_setups[0]
            for k, (name, (extra, env)) in enumerate(variants.items()):
                print(f"actual {i + 1}/{args.repeats}: {name} ...", flush=True)
                actual = _actual([*overrides, *extra], Path(tmp) / f"run{i}-{k}", env)
                runs[name].append(_compare(ideal, actual))
        for name, measured in runs.items():
            report[name] = _median(measured)
    report["ideal_setup_s"] = [round(x, 2) for x in ideal_setups]
    print(
        f"\n{'':38} {'steady ideal':>12} {'actual':>8} {'eff':>6} {'whole s':>8} {'whole eff':>9} "
        f"{'start-up':>8} same"
    )
    for name in variants:
        r = report[name]
        print(
            f"{name:38} {r['steady_round_ideal_s']:>12.2f} {r['steady_round_actual_s']:>8.2f} "
            f"{r['steady_efficiency']:>6.3f} {r['whole_run_actual_s']:>8.1f} "
            f"{r['whole_run_efficiency']:>9.3f} {r['startup_s']:>8.1f} "
            f"{'yes' if r['identical_metrics'] else 'NO'}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
