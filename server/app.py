"""FedMER ServerApp: config -> model + Flower strategy -> rounds -> result files.

The server evaluates the global model every round on held-out persons who are in no
client, logs the max and mean cumulative client epsilon, and writes per-round JSON
lines and CSV, a final checkpoint, a summary and a learning-curve plot.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedmer import records as rk
from fedmer.config import ExperimentConfig
from fedmer.data.feature_stats import FEATURE_STATS_JSON
from fedmer.data.registry import load_client_dataset, load_split
from fedmer.grid import PartitionOrderedGrid
from fedmer.models import build_model_for
from fedmer.models.multimodal import MultimodalEmotionNet
from fedmer.plots import plot_learning_curve
from fedmer.privacy.client_level import client_level_epsilon
from fedmer.privacy.run_noise import release_skipped_because
from fedmer.results import RunRecorder
from fedmer.standardization import collect_feature_stats
from fedmer.strategies import AccountedStrategy, RoundReport, build_strategy
from fedmer.train import evaluate_model

__all__ = ["app", "resolve_output_dir", "run_server"]

log = logging.getLogger(__name__)
app = ServerApp()
#: How long the server waits for every node to connect before the statistics query.
STATS_WAIT_S = 300.0


def resolve_output_dir(cfg: ExperimentConfig, run_id: int) -> Path:
    """``output.dir`` with ``{run_id}`` filled in, made absolute."""
    return Path(cfg.output_dir.replace("{run_id}", str(run_id))).expanduser().resolve()


def check_partitions(cfg: ExperimentConfig) -> list[int]:
    """Build every client's partition once, so a bad partition fails before round 1."""
    return [len(load_client_dataset(cfg, pid)) for pid in range(cfg.federation.num_clients)]


def _round_row(
    server_round: int,
    report: dict[str, Any],
    rr: RoundReport | None,
    cfg: ExperimentConfig,
    elapsed: float,
    client_eps: float | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    clients = rr.clients if rr else []
    eps = rr.epsilons() if rr else []
    off = not cfg.privacy.sample_level
    norms = [float(c[rk.UPDATE_NORM]) for c in clients]
    row = {
        "round": server_round,
        "accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"],
        "uar": report["uar"],
        "loss": report["loss"],
        "intensity_uar": report.get("intensity_uar"),
        "intensity_accuracy": report.get("intensity_accuracy"),
        "epsilon_max": (math.inf if off else max(eps)) if eps else (math.inf if off and clients else 0.0),
        "epsilon_mean": (math.inf if off else statistics.fmean(eps))
        if eps
        else (math.inf if off and clients else 0.0),
        "delta": None if off else cfg.privacy.delta,
        "accountant": "none" if off else cfg.privacy.accountant,
        "privacy_unit": "none" if off else "sample",
        "clients_sampled": rr.sampled if rr else 0,
        "clients_replied": len(clients),
        "clients_failed": len(rr.failures) if rr else 0,
        "clients_refused": len(rr.refusals) if rr else 0,
        "train_loss": statistics.fmean(float(c[rk.TRAIN_LOSS]) for c in clients) if clients else None,
        "update_norm_mean": statistics.fmean(norms) if norms else None,
        "update_clipped_frac": statistics.fmean(float(c[rk.UPDATE_CLIPPED]) for c in clients)
        if clients
        else None,
        "client_epsilon": client_eps,
        "elapsed_s": round(elapsed, 3),
    }
    detail = {
        "per_class_recall": report["per_class_recall"],
        "confusion": report["confusion"],
        "client_epsilons": {int(c[rk.PARTITION_ID]): float(c[rk.EPSILON]) for c in clients},
        "failures": rr.failures if rr else [],
        "refusals": rr.refusals if rr else [],
        "client_epsilons_lifetime": {
            int(c[rk.PARTITION_ID]): float(c[rk.EPSILON_LIFETIME])
            for c in clients
            if rk.EPSILON_LIFETIME in c
        },
    }
    return row, detail


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    """Node ids once ``wanted`` nodes are connected, or those connected after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < wanted and time.monotonic() < deadline:
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    return nodes


def _standardize(
    grid: Grid, cfg: ExperimentConfig, model: MultimodalEmotionNet, out_dir: Path
) -> dict[str, Any]:
    """Federated feature statistics into the global model before round 1 (data.standardize)."""
    skipped = release_skipped_because(cfg)
    if skipped:
        log.warning("no feature statistics: %s", skipped)
        return {"feature_stats": {"skipped": skipped}}
    nodes = wait_for_nodes(grid, cfg.federation.num_clients, timeout=STATS_WAIT_S)
    stats, failures = collect_feature_stats(grid, nodes, model.feature_slices, out_dir)
    missing = cfg.federation.num_clients - len(stats.clients)
    if missing > len(failures):
        failures.append(f"{missing - len(failures)} node(s) not connected within {STATS_WAIT_S:g} s")
    model.set_feature_stats(stats)
    unit = "none (exact sums)"
    if stats.noise_multiplier > 0:
        unit = (
            f"per sample: noise multiplier {stats.noise_multiplier:.3f}, clip {stats.clip_norm:g}, "
            f"in each client's epsilon (delta {cfg.privacy.delta:g}, {cfg.privacy.accountant})"
        )
    log.info("standardising inputs with statistics from %d client(s); DP: %s", len(stats.clients), unit)
    return {
        "feature_stats": {
            "file": FEATURE_STATS_JSON,
            "clients": list(stats.clients),
            "noise_multiplier": stats.noise_multiplier,
            "clip_norm": None if math.isinf(stats.clip_norm) else stats.clip_norm,
            "features_left_unstandardised": len(stats.floored),
            "failures": failures,
        }
    }


def run_server(grid: Grid, cfg: ExperimentConfig, run_id: int = 0) -> dict[str, Any]:
    """Run every round of ``cfg`` on ``grid``; return the summary (also written to disk)."""
    random.seed(cfg.seed)  # Flower's samplers use the module-level `random`
    torch.manual_seed(cfg.seed)
    split = load_split(cfg)
    sizes = check_partitions(cfg)
    out_dir = resolve_output_dir(cfg, run_id)
    log.info(
        "FedMER run: %d clients (%d-%d samples), %d held-out persons; results in %s",
        len(sizes),
        min(sizes),
        max(sizes),
        len(set(split.test.person.tolist())),
        out_dir,
    )

    model = build_model_for(cfg, split.test)
    strategy: AccountedStrategy = build_strategy(cfg)
    recorder = RunRecorder(out_dir, cfg)
    ordered = PartitionOrderedGrid(grid)
    stats_extra = _standardize(ordered, cfg, model, out_dir) if model.standardizer is not None else {}
    t0 = time.monotonic()
    progress = Progress(
        TextColumn("[bold]FedMER[/] round"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    task = progress.add_task("rounds", total=cfg.federation.num_rounds, status="")

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        report = evaluate_model(model, split.test)
        # Flower's client-level accountant (fixed clipping only; None when not accounted)
        client_eps = client_level_epsilon(strategy.inner) if cfg.privacy.client_level else None
        row, detail = _round_row(
            server_round, report, strategy.rounds.get(server_round), cfg, time.monotonic() - t0, client_eps
        )
        recorder.record(row, detail)
        status = f"UAR {row['uar']:.3f}  max ε {row['epsilon_max']:.2f}"
        if row["delta"] is not None:
            status += f" (δ={row['delta']:g}, {row['accountant']}, per sample)"
        if client_eps is not None:
            status += f"  client-level ε {client_eps:.2f} (δ={cfg.privacy.delta:g}, per client)"
        progress.update(task, completed=server_round, status=status)
        log.info(
            "round %d: held-out UAR %.4f, macro-F1 %.4f, acc %.4f | %s",
            server_round,
            row["uar"],
            row["macro_f1"],
            row["accuracy"],
            status,
        )
        return MetricRecord({k: float(row[k]) for k in ("accuracy", "macro_f1", "uar", "loss")})

    train_config = ConfigRecord({rk.LR: cfg.federation.lr, rk.LOCAL_EPOCHS: cfg.federation.local_epochs})
    with progress:
        result = strategy.start(
            grid=ordered,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=cfg.federation.num_rounds,
            train_config=train_config,
            evaluate_fn=evaluate_fn,
        )
    final_state = result.arrays.to_torch_state_dict() if result.arrays is not None else model.state_dict()
    extra = {
        "wall_time_s": round(time.monotonic() - t0, 2),
        "clients_failed_total": sum(len(r.failures) for r in strategy.rounds.values()),
        "clients_refused_total": sum(len(r.refusals) for r in strategy.rounds.values()),
        "chance_uar": 1.0 / split.test.num_classes,
        "class_names": list(split.test.class_names),
        **stats_extra,
    }
    summary = recorder.finish(final_state, extra)
    plot_learning_curve(
        recorder.rows,
        out_dir / "learning_curve.png",
        chance=1.0 / split.test.num_classes,
        title=f"{cfg.data.scenario}: {cfg.model.fusion} fusion, {cfg.strategy.name}, "
        f"{cfg.federation.num_clients} clients",
    )
    log.info(
        "FedMER finished: final held-out UAR %.4f; files in %s",
        summary["final"].get("uar", float("nan")),
        out_dir,
    )
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point (``flwr run .`` and the Hydra launcher both land here)."""
    cfg = ExperimentConfig.from_run_config(context.run_config, complete=True)
    run_server(grid, cfg, run_id=context.run_id)
