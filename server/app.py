"""FedMER ServerApp: config -> model + Flower strategy -> rounds -> result files.

The server evaluates the global model every round on held-out persons who are in no
client, logs the max and mean cumulative client epsilon, and writes per-round JSON
lines and CSV, a final checkpoint, a summary and a learning-curve plot.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedmer import records as rk
from fedmer.config import ExperimentConfig
from fedmer.data.registry import check_partitions, load_test_set
from fedmer.federation.grid import PartitionOrderedGrid
from fedmer.federation.resume import restore_rng, restore_server, round_checkpoint
from fedmer.federation.sampling import own_sampler
from fedmer.federation.statistics import standardize_model
from fedmer.federation.strategies import build_strategy
from fedmer.models import build_model_for
from fedmer.privacy.client_level import client_level_epsilon
from fedmer.privacy.run_noise import local_recipes
from fedmer.results.checkpoint import (
    ContinuedRecorder,
    ResumeError,
    RoundCheckpoint,
    resumable_checkpoint,
    save_checkpoint,
)
from fedmer.results.layout import LEARNING_CURVE_PNG, run_dir
from fedmer.results.progress import RoundProgress
from fedmer.results.recorder import RunRecorder
from fedmer.results.rounds import round_row, run_failure
from fedmer.training.loops import evaluate_model

__all__ = ["app", "run_server"]

log = logging.getLogger(__name__)
app = ServerApp()


def run_server(grid: Grid, cfg: ExperimentConfig, run_id: int = 0) -> dict[str, Any]:
    """Run every round of ``cfg`` on ``grid``; return the summary (also written to disk)."""
    with own_sampler(cfg.seed):  # Flower's client sampling on a stream that Ray does not draw from
        return _run_server(grid, cfg, run_id)


def _run_server(grid: Grid, cfg: ExperimentConfig, run_id: int) -> dict[str, Any]:
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    test = load_test_set(cfg)  # a fixed-size held-out set: no client's training data is built here
    sizes = check_partitions(cfg)  # counted, not built, where the dataset builds sites alone
    out_dir = run_dir(cfg.output_dir, run_id)
    resume = _resume_point(cfg, out_dir)
    run_tag = resume.run_id if resume else run_id  # a resumed run charges the ledgers as the same run
    log.info(
        "FedMER run: %d clients (%d-%d samples), %d held-out persons; results in %s",
        len(sizes), min(sizes), max(sizes), len(set(test.person.tolist())), out_dir,
    )  # fmt: skip

    if cfg.privacy.mode != "off" and cfg.federation.fraction_evaluate > 0:
        log.warning(
            "federation.fraction_evaluate=%g: every node asked to evaluate sends its exact loss and "
            "accuracy on its own data, neither noised nor accounted (set it to 0 to keep them home)",
            cfg.federation.fraction_evaluate,
        )
    model = build_model_for(cfg, test)
    strategy = build_strategy(cfg)
    ordered = PartitionOrderedGrid(grid, expected=cfg.federation.num_clients)
    recorder: RunRecorder
    if resume is None:
        recorder = RunRecorder(out_dir, cfg)
        stats_extra: dict[str, Any] = {}
        if model.standardizer is not None:
            stats_extra = standardize_model(ordered, cfg, model, out_dir)
    else:  # the statistics release happened before the first checkpoint: never released twice
        recorder = ContinuedRecorder(out_dir, cfg, last_round=resume.server_round)
        stats_extra = restore_server(resume, model, strategy)
        restore_rng(resume.rng)  # last: the next client sample is the one the killed run would have drawn
    offset = strategy.round_offset
    base = resume or RoundCheckpoint(0, cfg.to_run_config(), run_id, {}, extra=stats_extra)
    progress = RoundProgress(cfg.federation.num_rounds)
    t0 = time.monotonic() - (resume.elapsed_s if resume else 0.0)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Score the global model on the held-out persons; record the round; checkpoint the run."""
        server_round += offset
        if resume is not None and server_round == offset:
            return None  # the checkpoint's own round: recorded before the run was stopped
        state = arrays.to_torch_state_dict()  # as sent: FedAdam's arrays may be float64
        model.load_state_dict(state)
        report = evaluate_model(model, test)
        # Flower's client-level accountant (fixed clipping only; None when not accounted)
        client_eps = client_level_epsilon(strategy.inner) if cfg.privacy.client_level else None
        rr = strategy.rounds.get(server_round)
        row, detail = round_row(server_round, report, rr, cfg, time.monotonic() - t0, client_eps)
        recorder.record(row, detail)  # before the checkpoint: a resume cuts rows past its round
        elapsed = time.monotonic() - t0
        save_checkpoint(
            out_dir,
            round_checkpoint(base, row, detail, state, strategy, extra=stats_extra, elapsed_s=elapsed),
        )
        progress.update(row, cfg.privacy.delta)
        return MetricRecord({k: float(row[k]) for k in ("accuracy", "macro_f1", "uar", "loss")})

    train_config = ConfigRecord(
        {rk.LR: cfg.federation.lr, rk.LOCAL_EPOCHS: cfg.federation.local_epochs, rk.LEDGER_RUN: str(run_tag)}
    )
    if resume is not None:
        log.info("resuming %s after round %d of %d", out_dir, offset, cfg.federation.num_rounds)
    with progress:
        result = strategy.start(
            grid=ordered,
            initial_arrays=ArrayRecord(dict(resume.model) if resume else model.state_dict()),
            num_rounds=cfg.federation.num_rounds - offset,
            train_config=train_config,
            evaluate_fn=evaluate_fn,
            timeout=cfg.federation.round_timeout_s,
        )
    final_state = result.arrays.to_torch_state_dict() if result.arrays is not None else model.state_dict()
    failure = run_failure(strategy.rounds.values(), cfg.federation.max_failed_fraction)
    summary = recorder.finish(
        final_state,
        {
            "status": "failed" if failure else "ok",
            "failure": failure,
            "wall_time_s": round(time.monotonic() - t0, 2),
            "clients_failed_total": sum(len(r.failures) for r in strategy.rounds.values()),
            "clients_refused_total": sum(len(r.refusals) for r in strategy.rounds.values()),
            "clients_rejected_total": sum(len(r.rejections) for r in strategy.rounds.values()),
            "aggregates_rejected": [r.server_round for r in strategy.rounds.values() if r.aggregate_rejected],
            "chance_uar": 1.0 / test.num_classes,
            "class_names": list(test.class_names),
            "partition_queries": ordered.queried,
            "local_recipes": _recipes_by_partition(cfg, sizes),
            **stats_extra,
        },
    )
    from fedmer.results.figures import plot_learning_curve  # matplotlib: ~0.5 s, at the end, not at start-up

    plot_learning_curve(
        recorder.rows,
        out_dir / LEARNING_CURVE_PNG,
        chance=1.0 / test.num_classes,
        title=f"{cfg.data.scenario}: {cfg.model.fusion} fusion, {cfg.strategy.name}, "
        f"{cfg.federation.num_clients} clients",
    )
    if failure:  # the files are written for a post-mortem, but the run must not look like a success
        raise RuntimeError(f"FedMER run failed: {failure}; files in {out_dir}")
    log.info("FedMER finished: final held-out UAR %.4f; files in %s", summary["final"].get("uar"), out_dir)
    return summary


def _recipes_by_partition(cfg: ExperimentConfig, sizes: list[int]) -> dict[str, Any]:
    """``local_recipes(cfg, sizes)``, each distinct size worked out once (10,000 clients: one size)."""
    distinct = sorted(set(sizes))
    recipes = local_recipes(cfg, distinct)  # keyed 0..len(distinct)-1; empty without DP-SGD
    if not recipes:
        return {}
    by_size = dict(zip(distinct, recipes.values(), strict=True))
    return {str(pid): by_size[n] for pid, n in enumerate(sizes)}


def _resume_point(cfg: ExperimentConfig, out_dir: Path) -> RoundCheckpoint | None:
    """The checkpoint to continue (``resume=``), checked against this config; None for a new run."""
    if not cfg.resume:
        return None
    if Path(cfg.resume).expanduser().resolve() != out_dir:
        raise ResumeError(
            f"invalid resume={cfg.resume!r} with output.dir={cfg.output_dir!r}: a resumed run writes "
            "into the folder it continues (where its clients' ledgers are); set output.dir to it too "
            "(fedmer run does)"
        )
    return resumable_checkpoint(out_dir, cfg)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point (``flwr run .`` and the Hydra launcher both land here)."""
    cfg = ExperimentConfig.from_run_config(context.run_config, complete=True)
    run_server(grid, cfg, run_id=context.run_id)
