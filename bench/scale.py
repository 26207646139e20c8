"""Scale: 100, 1,000 and 10,000 registered clients with 20 sampled per round.

Each client count is one real simulation (``python -m simulations.run`` in a subprocess, the
path ``make run`` takes) on tiny per-client data, so what grows with the client count is the
bookkeeping, not the training. For each it measures

    launch -> round 1   wall time from starting the process to round 1's row in rounds.jsonl
                        (imports, Ray, data, node registration, the first sampled trainings)
    steady round        median time between consecutive rows from round 2 on (``elapsed_s``)
    peak memory         the largest sum of RSS over the driver and every process below it
                        (raylet, GCS, Ray workers), sampled every 0.5 s; RSS counts pages shared
                        between processes (torch's libraries) once per process, so it is an
                        upper bound, and comparable between client counts
    memory per round    that sum when each round's row appeared (growth over rounds)

and prints a table with each count's ratio to the smallest one (the targets of issue 12: time
per round and peak memory at 10,000 within 1.5x of 100, round 1 within 2x).

    .venv/bin/python -m bench.scale                              # 100, 1,000, 10,000; 3 rounds
    .venv/bin/python -m bench.scale --clients 100 1000 --rounds 4
    .venv/bin/python -m bench.scale --ray-address HOST:6379      # on a Ray cluster (RAY_ADDRESS)

With a cluster address the workers run in the cluster's raylets, not below this process: the
memory column is then the driver's tree on this machine only. Extra Hydra overrides go after
``--`` (``-- privacy=off``). Writes bench/results/scale.csv and scale.json.

    .venv/bin/python -m bench.scale --flower-costs               # Flower's per-node costs alone

measures, in this process and without Ray, what Flower 1.42's simulation runtime spends per
registered node: registering the nodes, registering each node's context (Flower's way and with
``simulations.flower_patches``), and one sweep of its message-polling thread with a round's
messages in flight (Flower's loop and the patched one). Writes bench/results/flower_costs.json.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import importlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Message

try:
    import psutil
except ImportError:  # Ray ships psutil in its thirdparty_files, which `import ray` puts on sys.path
    import ray  # noqa: F401

    psutil = importlib.import_module("psutil")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SAMPLE_S = 0.5
GIB = 1024**3


@dataclass
class ScaleResult:
    """What one simulation at one client count measured."""

    clients: int
    exit_code: int
    status: str
    launch_to_round1_s: float | None
    steady_round_s: float | None
    round_s: list[float]
    peak_tree_gb: float
    peak_driver_gb: float
    max_processes: int
    tree_gb_at_round: dict[int, float] = field(default_factory=dict)
    clients_failed: int | None = None
    final_uar: float | None = None
    wall_s: float = 0.0
    command: str = ""
    log_tail: str = ""  # the run's last output lines when it failed
    #: (seconds since launch, tree GiB, driver GiB, rounds written) every sample: where memory goes
    samples: list[tuple[float, float, float, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.status == "ok"


def overrides(clients: int, rounds: int, sampled: int, extra: list[str], out_dir: Path) -> list[str]:
    """Hydra overrides of one measured run: tiny data, ``sampled`` clients per round."""
    k = min(sampled, clients)
    return [
        f"federation.num_clients={clients}",
        f"federation.num_rounds={rounds}",
        f"federation.fraction_train={k / clients!r}",
        f"federation.min_train_clients={k}",
        "federation.fraction_evaluate=0.0",
        "federation.local_epochs=1",
        "federation.batch_size=8",
        "data.persons_per_site=1",
        "data.test_persons_per_site=1",
        "data.sequences_per_person=10",
        *extra,
        f"hydra.run.dir={out_dir}",
    ]


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


def _rows(out_dir: Path) -> list[dict[str, Any]]:
    files = sorted(out_dir.rglob("rounds.jsonl"))
    if not files:
        return []
    rows = []
    for line in files[0].read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return rows


def _stop(procs: list[psutil.Process]) -> None:
    """End the processes this benchmark started (the driver and its descendants), by pid."""
    for p in reversed(procs):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


def measure(clients: int, args: argparse.Namespace, work: Path) -> ScaleResult:
    """Run one simulation with ``clients`` registered clients and sample it until it ends."""
    out_dir = work / f"clients_{clients}"
    cmd = [
        sys.executable,
        "-m",
        "simulations.run",
        *overrides(clients, args.rounds, args.sampled, args.overrides, out_dir),
    ]
    env = dict(os.environ)
    if args.ray_address:
        env["RAY_ADDRESS"] = args.ray_address
    log_path = work / f"clients_{clients}.log"
    print(f"[scale] {clients} clients: {' '.join(cmd[1:])}", flush=True)
    seen: list[psutil.Process] = []
    with open(log_path, "w") as log:
        start_wall, start = time.time(), time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        peak_tree = peak_driver = 0
        max_procs = 0
        round1: float | None = None
        at_round: dict[int, float] = {}
        samples: list[tuple[float, float, float, int]] = []
        while proc.poll() is None:
            procs = _tree(root)
            seen.extend(p for p in procs if p not in seen)
            tree = _rss(procs)
            peak_tree = max(peak_tree, tree)
            driver = _rss(procs[:1])
            peak_driver = max(peak_driver, driver)
            max_procs = max(max_procs, len(procs))
            rows = _rows(out_dir)
            now = round(time.monotonic() - start, 1)
            samples.append((now, round(tree / GIB, 3), round(driver / GIB, 3), len(rows)))
            for row in rows:
                at_round.setdefault(int(row["round"]), round(tree / GIB, 3))
            if round1 is None and any(int(r["round"]) == 1 for r in rows):
                round1 = time.monotonic() - start
                if len(rows) == 2:  # only rounds 0 and 1 so far: the file's mtime is round 1's write
                    mtime = next(out_dir.rglob("rounds.jsonl")).stat().st_mtime
                    round1 = min(round1, mtime - start_wall)
            if time.monotonic() - start > args.timeout:
                print(f"[scale] {clients} clients: over --timeout {args.timeout} s, stopping", flush=True)
                _stop(_tree(root) or seen)
                break
            time.sleep(SAMPLE_S)
        code = proc.wait()
        wall = time.monotonic() - start
    leftover = [p for p in seen if p.is_running() and p.pid != proc.pid]
    if leftover:  # Ray's own processes normally exit with the driver; never leave ours behind
        _stop(leftover)
    rows = _rows(out_dir)
    elapsed = [float(r["elapsed_s"]) for r in rows if int(r["round"]) >= 1]
    per_round = [round(b - a, 3) for a, b in itertools.pairwise(elapsed)]
    summaries = sorted(out_dir.rglob("summary.json"))
    summary = json.loads(summaries[0].read_text()) if summaries else {}
    tail = ""
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        print(f"[scale] {clients} clients: exit {code}; last lines of its output:\n{tail}", flush=True)
    return ScaleResult(
        clients=clients,
        exit_code=code,
        status=str(summary.get("status", "no summary")),
        launch_to_round1_s=None if round1 is None else round(round1, 2),
        steady_round_s=round(statistics.median(per_round), 3) if per_round else None,
        round_s=per_round,
        peak_tree_gb=round(peak_tree / GIB, 3),
        peak_driver_gb=round(peak_driver / GIB, 3),
        max_processes=max_procs,
        tree_gb_at_round=at_round,
        clients_failed=summary.get("clients_failed_total"),
        final_uar=(summary.get("final") or {}).get("uar"),
        wall_s=round(wall, 1),
        command=" ".join(["python", *cmd[1:-1]]),
        log_tail=tail,
        samples=samples,
    )


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "-"


def table(results: list[ScaleResult]) -> str:
    """Markdown table, each count with its ratio to the first (smallest) one."""
    base = results[0]
    lines = [
        "| registered clients | launch -> round 1 (s) | steady round (s) | peak memory, tree (GiB) "
        "| driver (GiB) | memory at rounds 1 -> last (GiB) | exit | failed trainings |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rounds = sorted(k for k in r.tree_gb_at_round if k >= 1)
        growth = (
            f"{r.tree_gb_at_round[rounds[0]]:.2f} -> {r.tree_gb_at_round[rounds[-1]]:.2f}" if rounds else "-"
        )
        rel = r is not base
        lines.append(
            f"| {r.clients:,} | {r.launch_to_round1_s}"
            + (f" ({_ratio(r.launch_to_round1_s, base.launch_to_round1_s)})" if rel else "")
            + f" | {r.steady_round_s}"
            + (f" ({_ratio(r.steady_round_s, base.steady_round_s)})" if rel else "")
            + f" | {r.peak_tree_gb:.2f}"
            + (f" ({_ratio(r.peak_tree_gb, base.peak_tree_gb)})" if rel else "")
            + f" | {r.peak_driver_gb:.2f} | {growth} | {r.exit_code} | {r.clients_failed} |"
        )
    return "\n".join(lines)


def targets(results: list[ScaleResult]) -> list[str]:
    """Issue 12's targets, largest count against the smallest: met or not, with the ratios."""
    base, top = results[0], results[-1]
    if not (base.ok and top.ok):
        return [f"targets not checked: a run failed (exit {base.exit_code} / {top.exit_code})"]
    checks = (
        ("time per round", top.steady_round_s, base.steady_round_s, 1.5),
        ("peak memory", top.peak_tree_gb, base.peak_tree_gb, 1.5),
        ("launch -> round 1", top.launch_to_round1_s, base.launch_to_round1_s, 2.0),
    )
    out = []
    for name, value, ref, limit in checks:
        if value is None or not ref:
            out.append(f"{name}: not measured")
            continue
        ratio = value / ref
        verdict = "met" if ratio <= limit else "NOT met"
        out.append(
            f"{name} at {top.clients:,} vs {base.clients:,}: {ratio:.2f}x (target <= {limit}x): {verdict}"
        )
    return out


def _median_s(fn: Any, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _flower_sweep(state: Any, nodes: list[int]) -> None:
    """One sweep of Flower 1.42's ``vce_api.add_messages_to_queue``: every node asked in turn."""
    for node in nodes:
        state.get_message_ins(node_id=node, limit=1)


def flower_costs(counts: list[int], in_flight: int) -> list[dict[str, Any]]:
    """Flower's per-node costs at each node count (see the module docstring), in this process."""
    from flwr.app import RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.fleet.vce.vce_api import _register_node_info_stores, _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    from simulations.flower_patches import FLOWER_POLL_INTERVAL_S, POLL_INTERVAL_S, flower_patches, poll_once

    rows = []
    me = psutil.Process()
    for n in sorted(counts):
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
        run = Run.create_empty(run_id=1000 + n)
        run.primary_task_id, run.federation_id = 2000 + n, NOOP_FEDERATION_ID
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
        state = factory.state()
        state.run_ids[run.run_id] = RunRecord(run=run)  # as flwr.simulation.run_simulation does
        state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
        grid = InMemoryGrid(state_factory=factory)
        grid.set_run(run)
        rss0 = me.memory_info().rss
        t = time.perf_counter()
        mapping = _register_nodes(n, factory)
        register_nodes_s = time.perf_counter() - t
        t = time.perf_counter()
        stores = _register_node_info_stores(mapping, run, app_dir=str(ROOT))
        contexts_s = time.perf_counter() - t
        rss_nodes = me.memory_info().rss - rss0
        with flower_patches():
            t = time.perf_counter()
            _register_node_info_stores(mapping, run, app_dir=str(ROOT))
            contexts_patched_s = time.perf_counter() - t
        del stores
        k = min(in_flight, n)
        sampled = list(mapping)[:: max(1, n // k)][:k]
        grid.push_messages([Message(RecordDict(), node, "train") for node in sampled])
        nodes = list(mapping)
        delivered = [m for node in nodes for m in state.get_message_ins(node_id=node, limit=1)]
        assert len(delivered) == k  # in flight: delivered, awaiting replies, as during a round

        rank = {node: i for i, node in enumerate(nodes)}
        flower = _median_s(functools.partial(_flower_sweep, state, nodes), 3)
        patched = _median_s(functools.partial(poll_once, state, rank), 5)
        rows.append(
            {
                "nodes": n,
                "in_flight": k,
                "register_nodes_s": round(register_nodes_s, 3),
                "register_contexts_s": round(contexts_s, 3),
                "register_contexts_patched_s": round(contexts_patched_s, 3),
                "rss_nodes_and_contexts_mib": round(rss_nodes / 1024**2, 1),
                "poll_sweep_s": round(flower, 5),
                "poll_sweep_patched_s": round(patched, 6),
                "poll_busy_fraction": round(flower / (flower + FLOWER_POLL_INTERVAL_S), 3),
                "poll_busy_fraction_patched": round(patched / (patched + POLL_INTERVAL_S), 4),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[ScaleResult]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (steady rounds: 2 on)")
    parser.add_argument("--sampled", type=int, default=20, help="clients sampled per round")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is stopped")
    parser.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS", ""))
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for scale.csv and scale.json")
    parser.add_argument("--tag", default="", help="suffix of the result files (scale<tag>.csv)")
    parser.add_argument("--flower-costs", action="store_true", help="Flower's per-node costs only, no runs")
    parser.add_argument("--in-flight", type=int, default=20, help="--flower-costs: messages in flight")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    args = parser.parse_args(argv)
    if args.flower_costs:
        rows = flower_costs(args.clients, args.in_flight)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"flower_costs{args.tag}.json").write_text(json.dumps(rows, indent=2) + "\n")
        return []
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (a steady round is round 2 or later)")
    results = []
    with tempfile.TemporaryDirectory(prefix="fedmer-scale-") as tmp:
        for n in sorted(args.clients):
            results.append(measure(n, args, Path(tmp)))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(results))
    for line in targets(results):
        print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    lists = ("round_s", "tree_gb_at_round", "log_tail", "samples")
    fields = [k for k in asdict(results[0]) if k not in lists]
    with open(args.out / f"scale{args.tag}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow(asdict(r))
    machine = {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
        "python": platform.python_version(),
        "ray_address": args.ray_address or None,
        "git": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
    }
    payload = {
        "machine": machine,
        "rounds": args.rounds,
        "sampled": args.sampled,
        "results": [asdict(r) for r in results],
        "targets": targets(results),
    }
    (args.out / f"scale{args.tag}.json").write_text(json.dumps(payload, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
