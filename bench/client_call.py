"""One client call of the default run, broken into phases: where a steady call spends its time.

Builds the default run's config (what ``make run`` composes from ``configs/``), then calls the
real ClientApp train handler (``client.app.train``) for one node over several consecutive
rounds in this process, feeding each reply's weights back as the next round's global model.
The library functions each phase runs through are wrapped here (never in the library) with
``time.perf_counter`` timers that count *exclusive* time (a phase nested in another is taken
out of its parent), so the phases and ``other`` add up to the call:

    data            node_of (config, partition id, partition: cached per process)
    model           build_model_for + load_state_dict of the global weights
    DP setup        make_private (Opacus: GradSampleModule, DP optimizer, Poisson loader)
    noise search    local_recipe (the noise for the planned run, the local recipe)
    ledger          NodePrivacy: node_privacy, charge (cap check, ledger read + write), commit
    training steps  train_epochs (the DP-SGD steps)
    epsilon         compute_epsilon in the ledger and NodePrivacy.epsilon
    update clipping clip_update
    serialisation   ArrayRecord -> state dict in, state dict -> ArrayRecord out
    other           the rest (seeding, metrics, messages, logging)

The first call is a warm-up (cold caches, lazy imports) and is left out; the table is the
median of the steady calls. "Privacy bookkeeping" is noise search + ledger + epsilon. Each
round's outgoing weights and epsilons are hashed, so two revisions can be checked to train and
account bit for bit the same.

    .venv/bin/python -m bench.client_call                         # the working tree
    .venv/bin/python -m bench.client_call --compare A --after B   # revisions A and B, side by side

``--compare`` / ``--after`` export a revision with ``git archive`` into a temporary folder and
run this same script there in a subprocess (the working tree, without ``--after``, likewise),
alternating ``--repeats`` times; medians are over every steady call of every repeat. Results
go to ``bench/results/client_call.json``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "client_call.json"
PHASES = (
    "data",
    "model",
    "DP setup",
    "noise search",
    "ledger",
    "training steps",
    "epsilon",
    "update clipping",
    "serialisation",
    "other",
)
BOOKKEEPING = ("noise search", "ledger", "epsilon")


class PhaseClock:
    """Exclusive wall time per phase: a timed call nested in another is subtracted from its parent."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list[Any]] = []

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append([phase, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                name, start, nested = self._stack.pop()
                elapsed = time.perf_counter() - start
                self.totals[name] += elapsed - nested
                if self._stack:
                    self._stack[-1][2] += elapsed

        return timed

    def take(self) -> dict[str, float]:
        out, self.totals = dict(self.totals), defaultdict(float)
        return out


def _patch(clock: PhaseClock, phase: str, owner: Any, name: str) -> None:
    """Time ``owner.name`` as ``phase`` if it exists (revisions differ in what they define)."""
    if hasattr(owner, name):
        setattr(owner, name, clock.wrap(phase, getattr(owner, name)))


def _instrument(clock: PhaseClock) -> None:
    from flwr.app import ArrayRecord

    import client.app as app
    import fedmer.federation.client_round as client_round
    import fedmer.privacy.budget as budget
    import fedmer.privacy.ledger as ledger
    import fedmer.training.local as local

    _patch(clock, "data", app, "node_of")
    build = app.build_model_for

    def build_model_for(*args: Any, **kwargs: Any) -> Any:
        model = build(*args, **kwargs)
        model.load_state_dict = clock.wrap("model", model.load_state_dict)
        return model

    app.build_model_for = clock.wrap("model", build_model_for)
    _patch(clock, "serialisation", ArrayRecord, "to_torch_state_dict")
    _patch(clock, "serialisation", app, "ArrayRecord")
    _patch(clock, "noise search", client_round, "local_recipe")
    _patch(clock, "ledger", client_round, "node_privacy")
    _patch(clock, "ledger", budget.NodePrivacy, "charge")
    _patch(clock, "ledger", budget.NodePrivacy, "commit")
    _patch(clock, "epsilon", budget.NodePrivacy, "epsilon")
    _patch(clock, "epsilon", ledger, "compute_epsilon")
    _patch(clock, "DP setup", local, "make_private")
    _patch(clock, "training steps", local, "train_epochs")
    _patch(clock, "update clipping", app, "clip_update")


def _digest(state: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def measure(rounds: int, partition: int) -> dict[str, Any]:
    """Call the train handler for ``rounds`` consecutive rounds of one node; per-call phase times."""
    import warnings

    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import client.app as app
    from fedmer import records as rk
    from fedmer.data.registry import load_split
    from fedmer.models import build_model_for
    from simulations.compose import compose_experiment

    warnings.filterwarnings("ignore")  # Opacus' secure-RNG advice, once per call
    torch.set_num_threads(1)  # what node_of sets: one Ray CPU per client
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    with tempfile.TemporaryDirectory(prefix="fedmer-bench-") as out:
        exp = compose_experiment([], output_dir=f"{out}/{{run_id}}")
        torch.manual_seed(exp.seed)  # the same initial global model in every run
        model = build_model_for(exp, load_split(exp).test)
        arrays = ArrayRecord(model.state_dict())
        n = exp.federation.num_clients
        context = Context(
            run_id=1,
            node_id=partition + 1,
            node_config={"partition-id": partition, "num-partitions": n},
            state=RecordDict(),
            run_config=exp.to_run_config(),
        )
        clock = PhaseClock()
        _instrument(clock)
        calls: list[dict[str, float]] = []
        trace: list[dict[str, Any]] = []
        for server_round in range(1, rounds + 1):
            config = ConfigRecord(
                {
                    rk.SERVER_ROUND: server_round,
                    rk.LR: exp.federation.lr,
                    rk.LOCAL_EPOCHS: exp.federation.local_epochs,
                }
            )
            msg = Message(
                RecordDict({rk.ARRAYS: arrays, rk.CONFIG: config}),
                dst_node_id=partition + 1,
                message_type=MessageType.TRAIN,
            )
            start = time.perf_counter()
            reply = app.train(msg, context)
            total = time.perf_counter() - start
            phases = clock.take()
            phases["other"] = total - sum(phases.values())
            phases["total"] = total
            calls.append(phases)
            arrays = reply.content[rk.ARRAYS]
            metrics = reply.content[rk.METRICS]
            trace.append(
                {
                    "round": server_round,
                    "arrays_sha256": _digest(arrays.to_torch_state_dict()),
                    "epsilon": float(metrics[rk.EPSILON]),
                    "epsilon_lifetime": float(metrics[rk.EPSILON_LIFETIME]),
                    "noise_multiplier": float(metrics[rk.NOISE_MULTIPLIER]),
                    "train_loss": float(metrics.get(rk.TRAIN_LOSS, math.nan)),  # absent: minimal replies
                }
            )
    steady = calls[1:]
    median = {p: statistics.median(c.get(p, 0.0) for c in steady) for p in (*PHASES, "total")}
    share = [sum(c.get(p, 0.0) for p in BOOKKEEPING) / c["total"] for c in steady]
    return {
        "rounds": rounds,
        "steady_calls": len(steady),
        "partition": partition,
        "median_s": median,
        "bookkeeping_share": statistics.median(share),
        "calls": calls,
        "trace": trace,
    }


def table(label: str, result: dict[str, Any]) -> str:
    """Phase, median seconds, share of the median call; then the bookkeeping share."""
    med, total = result["median_s"], result["median_s"]["total"]
    lines = [f"{label}: median of {result['steady_calls']} steady calls (partition {result['partition']})"]
    lines.append(f"  {'phase':<16} {'median s':>9} {'share':>7}")
    for p in PHASES:
        lines.append(f"  {p:<16} {med[p]:>9.4f} {med[p] / total:>7.1%}")
    lines.append(f"  {'call (total)':<16} {total:>9.4f} {1:>7.1%}")
    lines.append(
        f"  privacy bookkeeping (noise search + ledger + epsilon): {result['bookkeeping_share']:.1%}"
    )
    return "\n".join(lines)


def _run_at(source: Path, rounds: int, partition: int) -> dict[str, Any]:
    """This script, run in a subprocess from ``source`` (a checkout of some revision)."""
    args = ["--rounds", str(rounds), "--partition", str(partition)]
    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        env = {**os.environ, "PYTHONPATH": str(source)}
        subprocess.run(
            [sys.executable, "-m", "bench.client_call", *args, "--raw", fh.name],
            cwd=source,
            env=env,
            check=True,
        )
        return json.loads(Path(fh.name).read_text())


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def _export(rev: str, into: Path) -> Path:
    """Revision ``rev`` as files (``git archive``), with this very script as its bench."""
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(f"git archive {rev} | tar -x -C {into}", shell=True, cwd=ROOT, check=True)
    (into / "bench" / "client_call.py").write_text(Path(__file__).read_text())
    return into


def _merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeats of one revision as one result: medians over every steady call of every repeat."""
    steady = [c for r in results for c in r["calls"][1:]]
    median = {p: statistics.median(c.get(p, 0.0) for c in steady) for p in (*PHASES, "total")}
    shares = [sum(c.get(p, 0.0) for p in BOOKKEEPING) / c["total"] for c in steady]
    traces = [r["trace"] for r in results]
    return {
        **results[0],
        "repeats": len(results),
        "steady_calls": len(steady),
        "median_s": median,
        "bookkeeping_share": statistics.median(shares),
        "calls": [c for r in results for c in r["calls"]],
        "trace": traces[0],
        "trace_repeatable": all(t == traces[0] for t in traces),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="calls per run; the first is a warm-up")
    parser.add_argument("--partition", type=int, default=0)
    parser.add_argument("--compare", metavar="REV", help="also run revision REV (the before)")
    parser.add_argument("--after", metavar="REV", help="run revision REV instead of the working tree")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternating (shared machines)")
    parser.add_argument("--raw", help=argparse.SUPPRESS)  # subprocess mode: write the result here
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (one warm-up, one steady call)")
    if args.raw:
        Path(args.raw).write_text(json.dumps(measure(args.rounds, args.partition)))
        return
    with tempfile.TemporaryDirectory(prefix="fedmer-rev-") as tmp:
        sources: dict[str, Path] = {}
        for rev in (args.compare, args.after):
            if rev:
                short = _git("rev-parse", "--short", rev)
                sources[f"revision {short}"] = _export(short, Path(tmp) / short)
        if not args.after:
            head = _git("rev-parse", "--short", "HEAD")
            dirty = (
                " (with uncommitted changes)" if _git("status", "--porcelain", "--untracked-files=no") else ""
            )
            sources[f"working tree at {head}{dirty}"] = ROOT
        results: dict[str, list[dict[str, Any]]] = {label: [] for label in sources}
        for _ in range(args.repeats):
            for label, source in sources.items():
                results[label].append(_run_at(source, args.rounds, args.partition))
    runs = {label: _merge(r) for label, r in results.items()}
    for label, result in runs.items():
        print(table(label, result), end="\n\n")
    traces = [r["trace"] for r in runs.values()]
    same = all(t == traces[0] for t in traces) and all(r["trace_repeatable"] for r in runs.values())
    if len(runs) > 1:
        print(f"outgoing weights and epsilons of every round identical across runs: {same}")
    for t in traces[0]:
        print(f"  round {t['round']}: weights {t['arrays_sha256']} epsilon {t['epsilon']!r}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.client_call " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"command": command.strip(), "torch_threads": 1, "identical_across_runs": same, "runs": runs}
    RESULTS.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
