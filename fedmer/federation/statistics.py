"""Federated standardisation, end to end: the server's query, each client's accounted release.

With ``data.standardize=federated`` the ServerApp asks every node, once before round 1, for
its feature sums (a QUERY message naming :data:`records.QUERY_FEATURE_STATS`). Each node
answers with :func:`fedmer.data.feature_stats.local_release`; under sample-level DP that is
a Gaussian release whose noise multiplier is the smallest that spends at most
``privacy.stats_epsilon_fraction x privacy.target_epsilon`` on its own, written to the
node's ledger *before* it is sent and appended to the run's accountant history, so every
epsilon the node reports afterwards includes it. The DP-SGD noise is derived with that
release as a prior (:mod:`fedmer.privacy.run_noise`), so release plus training meet
``target_epsilon`` together.

The server combines the replies into :class:`FeatureStats`, writes them to
``feature_stats.json`` in the run folder, and sets them in the global model's
:class:`InputStandardizer` before the first round: from there they travel inside the model.
A node that fails or refuses (spent budget) is recorded and left out; the statistics are
then those of the others, and the log and the file say so.

With ``data.standardize=calibration`` no node is asked: the server computes the exact
statistics of its own calibration persons (:func:`fedmer.data.registry.load_calibration_set`,
the training persons of ``data.calibration_sites`` sites that are not clients). That data is
public by assumption (an operator's in-house recordings), so it costs no client any epsilon,
and it is protected by none: the summary says so.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedmer import records as rk
from fedmer.config import ExperimentConfig
from fedmer.data.base import MultimodalDataset
from fedmer.data.feature_stats import (
    FeatureStats,
    StatsRelease,
    combine_releases,
    exact_feature_stats,
    local_release,
)
from fedmer.data.registry import load_calibration_set
from fedmer.federation.grid import short_reason
from fedmer.federation.node import node_privacy, wait_for_nodes
from fedmer.models.multimodal import MultimodalEmotionNet
from fedmer.privacy.run_noise import release_skipped_because, stats_noise_multiplier
from fedmer.results.layout import FEATURE_STATS_JSON
from fedmer.training.loops import seed_everything

__all__ = [
    "STATS_WAIT_S",
    "answer_stats_query",
    "collect_feature_stats",
    "is_stats_query",
    "standardize_model",
]

log = logging.getLogger(__name__)
#: How long the server waits for every node to connect before the statistics query.
STATS_WAIT_S = 300.0


def is_stats_query(msg: Message) -> bool:
    config = msg.content.config_records.get(rk.CONFIG)
    return config is not None and config.get(rk.QUERY) == rk.QUERY_FEATURE_STATS


def answer_stats_query(
    msg: Message, context: Context, cfg: ExperimentConfig, pid: int, data: MultimodalDataset
) -> Message:
    """Release this node's feature sums; under DP, pay for it in the ledger first."""
    if cfg.data.standardize != "federated" or release_skipped_because(cfg):
        raise ValueError(
            "feature statistics were asked for, but this run releases none: "
            + (release_skipped_because(cfg) or f"data.standardize={cfg.data.standardize}")
        )
    sigma = stats_noise_multiplier(cfg)
    clip = cfg.privacy.stats_clip_norm if cfg.privacy.sample_level else math.inf
    if sigma > 0:
        # Checked against the cap and written to the ledger before anything leaves the node.
        privacy = node_privacy(context, cfg, pid)
        privacy.charge((sigma, 1.0, 1), server_round=0)
        privacy.commit(privacy.history.extended([(sigma, 1.0, 1)]))
    rng = np.random.default_rng(seed_everything(cfg.seed, 0, pid))
    release = local_release(data, clip_norm=clip, noise_multiplier=sigma, rng=rng)
    log.info(
        "client %d: released feature sums of %d samples (noise multiplier %.3f, clip %g; %d clipped)",
        pid,
        len(data),
        sigma,
        clip,
        release.clipped,
    )
    sums = {key: torch.from_numpy(getattr(release, key)) for key in rk.STATS_SUMS}
    arrays = ArrayRecord({**sums, rk.STATS_COUNT: torch.from_numpy(release.count)})
    metrics = MetricRecord(
        {
            rk.PARTITION_ID: pid,
            rk.STATS_NOISE_MULTIPLIER: sigma,
            rk.STATS_CLIP_NORM: -1.0 if math.isinf(clip) else clip,
        }
    )
    return Message(content=RecordDict({rk.STATS: arrays, rk.METRICS: metrics}), reply_to=msg)


def _release_of(reply: Message) -> StatsRelease:
    arrays = cast(ArrayRecord, reply.content[rk.STATS]).to_torch_state_dict()
    metrics = reply.content[rk.METRICS]
    clip = float(rk.scalar(metrics, rk.STATS_CLIP_NORM))
    sums: dict[str, Any] = {key: arrays[key].numpy() for key in rk.STATS_SUMS}  # the four sum_* fields
    return StatsRelease(
        **sums,
        count=arrays[rk.STATS_COUNT].numpy(),
        clip_norm=math.inf if clip < 0 else clip,
        noise_multiplier=float(rk.scalar(metrics, rk.STATS_NOISE_MULTIPLIER)),
    )


def collect_feature_stats(
    grid: Grid,
    node_ids: list[int],
    feature_slices: tuple[tuple[int, int], ...],
    out_dir: Path,
    timeout: float = 600.0,
) -> tuple[FeatureStats, list[str]]:
    """Ask ``node_ids`` for their sums; combine; write ``feature_stats.json``; return stats and failures."""
    queries = [
        Message(
            content=RecordDict({rk.CONFIG: ConfigRecord({rk.QUERY: rk.QUERY_FEATURE_STATS})}),
            message_type=MessageType.QUERY,
            dst_node_id=n,
        )
        for n in node_ids
    ]
    releases: dict[int, StatsRelease] = {}
    failures: list[str] = []
    replied = set()
    for reply in grid.send_and_receive(queries, timeout=timeout):
        node = reply.metadata.src_node_id
        replied.add(node)
        if reply.has_error():
            text = reply.error.reason or f"error code {reply.error.code} without a reason"
            failures.append(f"node {node}: {short_reason(text)}")
            continue
        releases[int(rk.scalar(reply.content[rk.METRICS], rk.PARTITION_ID))] = _release_of(reply)
    failures += [f"node {n}: no reply within {timeout:g} s" for n in node_ids if n not in replied]
    if failures:
        log.warning(
            "feature statistics: %d of %d node(s) did not contribute:\n  %s",
            len(failures),
            len(node_ids),
            "\n  ".join(sorted(failures)),
        )
    if not releases:
        raise RuntimeError("no node released feature statistics: " + "; ".join(sorted(failures)))
    stats = combine_releases(releases, feature_slices)
    stats.write(out_dir / FEATURE_STATS_JSON)
    log.info(
        "feature statistics from %d client(s) (noise multiplier %.3f): written to %s",
        len(releases),
        stats.noise_multiplier,
        out_dir / FEATURE_STATS_JSON,
    )
    return stats, sorted(failures)


def standardize_model(
    grid: Grid, cfg: ExperimentConfig, model: MultimodalEmotionNet, out_dir: Path
) -> dict[str, Any]:
    """Federated feature statistics into the global model before round 1 (``data.standardize``).

    Returns what the run's summary says about them (source, DP, who contributed, failures).
    """
    if cfg.data.standardize == "calibration":
        return _standardize_from_calibration(cfg, model, out_dir)
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
            "source": "federated",
            "clients": list(stats.clients),
            "noise_multiplier": stats.noise_multiplier,
            "clip_norm": None if math.isinf(stats.clip_norm) else stats.clip_norm,
            "features_left_unstandardised": len(stats.floored),
            "failures": failures,
        }
    }


def _standardize_from_calibration(
    cfg: ExperimentConfig, model: MultimodalEmotionNet, out_dir: Path
) -> dict[str, Any]:
    """Exact statistics of the server's calibration persons into the global model; no node is asked."""
    calibration = load_calibration_set(cfg)
    stats = exact_feature_stats(calibration)
    stats.write(out_dir / FEATURE_STATS_JSON)
    model.set_feature_stats(stats)
    persons = sorted(int(p) for p in np.unique(calibration.person))
    log.info(
        "standardising inputs with the exact statistics of %d calibration sample(s) of %d person(s) "
        "the server holds (public by assumption: no client's data, no epsilon spent, none protected)",
        len(calibration),
        len(persons),
    )
    return {
        "feature_stats": {
            "file": FEATURE_STATS_JSON,
            "source": "calibration",
            "calibration_persons": persons,
            "calibration_samples": len(calibration),
            "clients": [],
            "noise_multiplier": 0.0,
            "clip_norm": None,
            "features_left_unstandardised": len(stats.floored),
            "failures": [],
        }  # what protects them: the privacy statement's "standardization" (config.json, summary.json)
    }
