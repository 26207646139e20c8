"""The statistics round trip: server query -> real ClientApp handlers -> combined statistics.

A Grid that delivers each QUERY to the real ``client.app.query`` of the addressed node (one
Context per node, as a SuperNode keeps) stands in for the transport; the e2e suite runs
the same protocol over Ray.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict

from fedmer.config import ExperimentConfig
from fedmer.data.base import concat_datasets
from fedmer.data.feature_stats import exact_feature_stats, read_feature_stats
from fedmer.data.registry import load_client_dataset
from fedmer.federation.statistics import collect_feature_stats, standardize_model
from fedmer.results.layout import FEATURE_STATS_JSON
from tests.conftest import NodeListGrid


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


class ClientAppGrid(NodeListGrid):
    """Delivers each message to the real ClientApp query handler of node ``i + 1`` (partition i)."""

    def __init__(self, flat: dict, n: int, broken: int | None = None) -> None:
        super().__init__(list(range(1, n + 1)))
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": n},
                state=RecordDict(),
                run_config=dict(flat),
            )
            for node in self.nodes
        }
        self.broken = broken

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        from client.app import query

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node == self.broken:
                reply = Message(Error(code=0, reason="Exception: disk full"), reply_to=msg)
            else:
                reply = query(msg, self.contexts[node])
            reply.metadata.__dict__["_src_node_id"] = node  # what the SuperLink stamps on replies
            replies.append(reply)
        return replies


FLAT = ExperimentConfig().to_run_config() | {
    "data.persons_per_site": 2,
    "data.sequences_per_person": 12,
    "federation.num_clients": 3,
    "data.standardize": "federated",
    "privacy.mode": "off",
}


def test_without_dp_the_federation_gets_the_pooled_statistics(tmp_path) -> None:
    cfg = ExperimentConfig.from_run_config(FLAT)
    grid = ClientAppGrid(FLAT, 3)
    data = [load_client_dataset(cfg, i) for i in range(3)]
    stats, failures = collect_feature_stats(grid, grid.nodes, data[0].feature_slices, tmp_path)
    assert failures == [] and stats.clients == (0, 1, 2)
    pooled = exact_feature_stats(concat_datasets(data))
    for key in ("mean", "std", "mean_sd", "std_mean", "std_sd"):
        np.testing.assert_allclose(getattr(stats, key), getattr(pooled, key), rtol=1e-9, atol=1e-12)
    assert read_feature_stats(tmp_path / FEATURE_STATS_JSON) == stats


def test_a_failed_node_is_recorded_and_the_others_still_count(tmp_path) -> None:
    cfg = ExperimentConfig.from_run_config(FLAT)
    grid = ClientAppGrid(FLAT, 3, broken=2)
    stats, failures = collect_feature_stats(
        grid, grid.nodes, load_client_dataset(cfg, 0).feature_slices, tmp_path
    )
    assert stats.clients == (0, 2)
    assert len(failures) == 1 and failures[0].startswith("node 2:") and "disk full" in failures[0]
    pooled = exact_feature_stats(concat_datasets([load_client_dataset(cfg, i) for i in (0, 2)]))
    np.testing.assert_allclose(stats.mean, pooled.mean, rtol=1e-9, atol=1e-12)


def test_under_dp_every_node_pays_once_and_the_statistics_are_noisy(tmp_path) -> None:
    flat = FLAT | {"privacy.mode": "sample", "output.dir": str(tmp_path)}
    cfg = ExperimentConfig.from_run_config(flat)
    grid = ClientAppGrid(flat, 3)
    stats, failures = collect_feature_stats(
        grid, grid.nodes, load_client_dataset(cfg, 0).feature_slices, tmp_path
    )
    assert failures == [] and stats.noise_multiplier > 0 and stats.clip_norm == 20.0
    assert all((tmp_path / "ledgers" / f"client-{i}.json").is_file() for i in range(3))
    pooled = exact_feature_stats(concat_datasets([load_client_dataset(cfg, i) for i in range(3)]))
    assert not np.allclose(stats.count, pooled.count)  # noised, not exact
    assert all(math.isfinite(v) for v in stats.mean + stats.std)


def test_no_node_answering_stops_the_run(tmp_path) -> None:
    cfg = ExperimentConfig.from_run_config(FLAT)
    grid = ClientAppGrid(FLAT, 1, broken=1)
    with pytest.raises(
        RuntimeError, match="no node released feature statistics: node 1: Exception: disk full"
    ):
        collect_feature_stats(grid, grid.nodes, load_client_dataset(cfg, 0).feature_slices, tmp_path)


def test_a_share_too_small_to_certify_releases_nothing_and_says_why(tmp_path) -> None:
    """RDP cannot certify one Gaussian release below epsilon ~0.103 at delta 1e-5 with any noise."""
    from fedmer.privacy.engine import PrivacyHistory, compute_epsilon

    floor = compute_epsilon(PrivacyHistory(((1e6, 1.0, 1),)), 1e-5)  # Opacus' default orders, up to 63
    assert 0.1 < floor < 0.11
    from fedmer.models import build_model_for
    from fedmer.privacy.run_noise import dp_sgd_noise, release_skipped_because, stats_prior

    flat = FLAT | {"privacy.mode": "sample", "privacy.target_epsilon": 1.0, "output.dir": str(tmp_path)}
    cfg = ExperimentConfig.from_run_config(flat)
    reason = release_skipped_because(cfg)
    assert (
        reason
        and "privacy.stats_epsilon_fraction=0.1" in reason
        and "raise privacy.stats_epsilon_fraction" in reason
    )
    assert stats_prior(cfg) == ()  # DP-SGD gets the whole budget
    plain = ExperimentConfig.from_run_config(flat | {"data.standardize": "none"})
    assert dp_sgd_noise(cfg, 100) == dp_sgd_noise(plain, 100)
    data = load_client_dataset(cfg, 0)
    model = build_model_for(cfg, data)
    extra = standardize_model(ClientAppGrid(flat, 3, broken=1), cfg, model, tmp_path)  # no node is asked
    assert extra == {"feature_stats": {"skipped": reason}}
    assert not (tmp_path / FEATURE_STATS_JSON).exists()
    from client.app import query

    with pytest.raises(ValueError, match="releases none"):
        query(_stats_query_message(), ClientAppGrid(flat, 3).contexts[1])
    assert (
        release_skipped_because(
            ExperimentConfig.from_run_config(flat | {"privacy.stats_epsilon_fraction": 0.3})
        )
        is None
    )


def _stats_query_message() -> Message:
    from flwr.app import ConfigRecord, MessageType

    from fedmer import records as rk

    config = ConfigRecord({rk.QUERY: rk.QUERY_FEATURE_STATS})
    return Message(RecordDict({rk.CONFIG: config}), dst_node_id=1, message_type=MessageType.QUERY)
