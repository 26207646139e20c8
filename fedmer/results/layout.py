"""The run folder's layout: every file name a run writes, and how ``{run_id}`` is filled in.

One definition, so the ServerApp that writes a run, the ClientApps that keep their ledgers in
it, the post-hoc tools and the sweep report that read it back, and the benchmarks can never
disagree about where a file is.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "AUDIT_JSON",
    "AUDIT_PNG",
    "BUNDLE",
    "CHECKPOINT",
    "CONFIG_JSON",
    "FEATURE_STATS_JSON",
    "LEARNING_CURVE_PNG",
    "LEDGER_DIR",
    "RESUME_CHECKPOINT",
    "ROUNDS_CSV",
    "ROUNDS_JSONL",
    "RUN_ID",
    "RUN_LOCK",
    "SUMMARY_JSON",
    "ledger_file",
    "run_dir",
]

#: The placeholder ``output.dir`` may hold; replaced by Flower's run id.
RUN_ID = "{run_id}"

ROUNDS_JSONL = "rounds.jsonl"
ROUNDS_CSV = "rounds.csv"
SUMMARY_JSON = "summary.json"
CONFIG_JSON = "config.json"
CHECKPOINT = "model.pt"
#: Written atomically after every round: what ``resume=<run folder>`` continues from.
RESUME_CHECKPOINT = "checkpoint.pt"
#: The final global model with its input layout, front-ends, class names and privacy statement
#: (fedmer.edge.bundle): loads with no data.
BUNDLE = "model_bundle.pt"
LEARNING_CURVE_PNG = "learning_curve.png"
FEATURE_STATS_JSON = "feature_stats.json"
AUDIT_JSON = "audit.json"
AUDIT_PNG = "audit_roc.png"
#: Held by the process writing a run (its pid), so a second run cannot write into the folder.
RUN_LOCK = "run.lock"
#: Simulated nodes keep their privacy ledgers here (a real SuperNode names its own file).
LEDGER_DIR = "ledgers"


def run_dir(output_dir: str, run_id: int) -> Path:
    """``output.dir`` with ``{run_id}`` filled in, made absolute."""
    return Path(output_dir.replace(RUN_ID, str(run_id))).expanduser().resolve()


def ledger_file(folder: Path, partition_id: int) -> Path:
    """Client ``partition_id``'s ledger in ``folder`` (a run's ``ledgers/``, or another ledger folder)."""
    return Path(folder) / f"client-{partition_id}.json"
