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

from fedmer.centralized import concat_datasets
from fedmer.config import ExperimentConfig
from fedmer.data.feature_stats import FEATURE_STATS_JSON, exact_feature_stats, read_feature_stats
from fedmer.data.registry import load_client_dataset
from fedmer.standardization import collect_feature_stats
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
    with pytest.raises(RuntimeError, match="no node released feature statistics: node 1: Exception: disk full"):
        collect_feature_stats(grid, grid.nodes, load_client_dataset(cfg, 0).feature_slices, tmp_path)
