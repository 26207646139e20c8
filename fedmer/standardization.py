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
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedmer import records as rk
from fedmer.config import ExperimentConfig
from fedmer.data.base import MultimodalDataset
from fedmer.data.feature_stats import (
    FEATURE_STATS_JSON,
    FeatureStats,
    StatsRelease,
    combine_releases,
    local_release,
)
from fedmer.grid import short_reason
from fedmer.privacy.budget import open_budget
from fedmer.privacy.engine import PrivacyHistory
from fedmer.privacy.run_noise import release_skipped_because, stats_noise_multiplier
from fedmer.train import seed_everything

__all__ = ["answer_stats_query", "collect_feature_stats", "is_stats_query"]

log = logging.getLogger(__name__)


def is_stats_query(msg: Message) -> bool:
    config = msg.content.config_records.get(rk.CONFIG)
    return config is not None and config.get(rk.QUERY) == rk.QUERY_FEATURE_STATS


def answer_stats_query(
    msg: Message, context: Context, cfg: ExperimentConfig, pid: int, data: MultimodalDataset
) -> Message:
    """Release this node's feature sums; under DP, pay for it in the ledger first."""
    if cfg.data.standardize == "none" or release_skipped_because(cfg):
        raise ValueError(
            "feature statistics were asked for, but this run releases none: "
            + (release_skipped_because(cfg) or "data.standardize=none")
        )
    sigma = stats_noise_multiplier(cfg)
    clip = cfg.privacy.stats_clip_norm if cfg.privacy.sample_level else math.inf
    if sigma > 0:
        # Checked against the cap and written to the ledger before anything leaves the node.
        open_budget(context, cfg, pid, (sigma, 1.0, 1), server_round=0)
        history = (
            PrivacyHistory.from_lists(dict(context.state[rk.PRIVACY_STATE]))
            if rk.PRIVACY_STATE in context.state
            else PrivacyHistory()
        )
        context.state[rk.PRIVACY_STATE] = ConfigRecord(history.extended([(sigma, 1.0, 1)]).to_lists())
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
    arrays = reply.content[rk.STATS].to_torch_state_dict()
    metrics = reply.content[rk.METRICS]
    clip = float(metrics[rk.STATS_CLIP_NORM])
    return StatsRelease(
        **{key: arrays[key].numpy() for key in rk.STATS_SUMS},
        count=arrays[rk.STATS_COUNT].numpy(),
        clip_norm=math.inf if clip < 0 else clip,
        noise_multiplier=float(metrics[rk.STATS_NOISE_MULTIPLIER]),
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
            failures.append(f"node {node}: {short_reason(reply.error.reason)}")
            continue
        releases[int(reply.content[rk.METRICS][rk.PARTITION_ID])] = _release_of(reply)
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
