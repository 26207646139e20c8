"""Scale: a process builds only the data it uses; the server knows simulated nodes' partitions;
Flower's per-node polling and context registration are worked around.

Issue 12 measured 10,000 registered clients costing 76 s of data building in the driver and
148-165 s again in each Ray actor (every process built every partition), an evaluation set
that grew with the federation, and a start-up query to every node (328 s). These tests pin the
structure that removes those costs, without timing anything.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.serverapp.strategy import strategy_utils
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedmer.config import ConfigError, DataConfig, ExperimentConfig, FederationConfig, PartitionConfig
from fedmer.data import registry, synthetic
from fedmer.data.base import MultimodalDataset
from fedmer.data.partition import partition_clients
from fedmer.data.synthetic import REFERENCE_SITES, generate_synthetic, synthetic_site, synthetic_test
from fedmer.edge.bundle import write_run_bundle
from fedmer.federation import grid as grid_module
from fedmer.federation.grid import PartitionOrderedGrid, registration_order
from fedmer.federation.resume import capture_rng, restore_rng
from fedmer.federation.sampling import SAMPLER, own_sampler
from fedmer.models import build_model_for
from simulations.flower_patches import flower_patches, poll_once
from tests.conftest import NodeListGrid

TINY = DataConfig(persons_per_site=2, test_persons_per_site=1, sequences_per_person=10, seq_len=6)
FIELDS = ("x", "mask", "y", "person", "site", "intensity")


def _same(a: MultimodalDataset, b: MultimodalDataset) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def _experiment(num_clients: int, data: DataConfig = TINY, **partition: object) -> ExperimentConfig:
    return ExperimentConfig(
        data=data,
        partition=PartitionConfig(**partition),  # type: ignore[arg-type]
        federation=FederationConfig(num_clients=num_clients, fraction_train=min(1.0, 20 / num_clients)),
    )


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """Every (site, person index) the synthetic generator builds while the test runs."""
    seen: list[tuple[int, int]] = []
    real = synthetic._person

    def counting(spec, cfg, seed, site, site_id, index):  # type: ignore[no-untyped-def]
        seen.append((site_id, index))
        return real(spec, cfg, seed, site, site_id, index)

    monkeypatch.setattr(synthetic, "_person", counting)
    registry.clear_data_cache()
    synthetic._reference_stats.cache_clear()
    yield seen
    registry.clear_data_cache()
    synthetic._reference_stats.cache_clear()


@pytest.mark.parametrize("num_sites", [3, REFERENCE_SITES + 3])
def test_a_site_built_alone_equals_its_rows_of_the_pool(num_sites: int) -> None:
    split = generate_synthetic(TINY, num_sites, seed=4)
    for site in range(num_sites):
        rows = np.flatnonzero(split.train.site == site)
        assert _same(synthetic_site(TINY, num_sites, 4, site), split.train.subset(rows))
    assert _same(synthetic_test(TINY, num_sites, 4), split.test)


def test_a_site_does_not_depend_on_how_many_sites_follow_it() -> None:
    """Past the reference sites, site k of a 20-site fleet is site k of a 10,000-site fleet."""
    for site in (0, 7, 15):
        assert _same(synthetic_site(TINY, 20, 1, site), synthetic_site(TINY, 10_000, 1, site))


def test_a_client_builds_its_own_site_and_the_reference_statistics_only(built: list[tuple[int, int]]) -> None:
    cfg = _experiment(10_000)
    client = registry.load_client_dataset(cfg, 7_777)
    assert set(client.site.tolist()) == {7_777} and len(client) == 2 * 10
    reference = {(s, p) for s in range(REFERENCE_SITES) for p in range(TINY.persons_per_site)}
    own = {(7_777, p) for p in range(TINY.persons_per_site)}
    assert sorted(built) == sorted(reference | own), "only its site plus the statistics' reference persons"
    built.clear()
    registry.load_client_dataset(cfg, 42)  # a second client in the same process: its own persons only
    assert sorted(built) == [(42, 0), (42, 1)]
    registry.load_client_dataset(cfg, 42)
    assert sorted(built) == [(42, 0), (42, 1)], "cached"


@pytest.mark.parametrize("missing", [0.0, 0.6])
def test_a_client_built_alone_equals_the_client_built_with_all(missing: float) -> None:
    registry.clear_data_cache()
    cfg = _experiment(12, modality_missing_rate=missing)
    together = partition_clients(generate_synthetic(TINY, 12, cfg.seed).train, cfg.partition, 12, cfg.seed)
    for pid in range(12):
        assert _same(registry.load_client_dataset(cfg, pid), together[pid])
    registry.clear_data_cache()


def test_sizes_are_counted_without_building_any_client(built: list[tuple[int, int]]) -> None:
    cfg = _experiment(10_000)
    sizes = registry.partition_sizes(cfg)
    assert built == [] and sizes == [TINY.persons_per_site * TINY.sequences_per_person] * 10_000
    small = _experiment(5)
    assert registry.partition_sizes(small) == [len(registry.load_client_dataset(small, p)) for p in range(5)]


def test_check_partitions_at_10000_clients_builds_only_the_fixed_held_out_set(
    built: list[tuple[int, int]],
) -> None:
    registry.check_partitions(_experiment(10_000))
    held_out = {(s, TINY.persons_per_site + p) for s in range(TINY.test_sites) for p in range(1)}
    reference = {(s, p) for s in range(REFERENCE_SITES) for p in range(TINY.persons_per_site)}
    assert set(built) == held_out | reference


def test_dirichlet_sizes_are_the_built_partitions() -> None:
    registry.clear_data_cache()
    cfg = _experiment(6, scheme="dirichlet", alpha=5.0, min_samples=1)
    assert registry.partition_sizes(cfg) == [len(registry.load_client_dataset(cfg, p)) for p in range(6)]
    registry.clear_data_cache()


def test_a_too_small_client_built_alone_names_itself() -> None:
    registry.clear_data_cache()
    with pytest.raises(ConfigError, match=r"client 7 gets 20 .*min_samples=21"):
        registry.load_client_dataset(_experiment(100, min_samples=21), 7)
    with pytest.raises(ConfigError, match=r"client 0 gets 20 .*min_samples=21"):
        registry.check_partitions(_experiment(100, min_samples=21))


def test_the_held_out_set_has_a_fixed_size_whatever_the_federation() -> None:
    registry.clear_data_cache()
    sets = {n: registry.load_test_set(_experiment(n)) for n in (10, 100, 10_000)}
    per_site = TINY.test_persons_per_site * TINY.sequences_per_person
    for test in sets.values():
        assert len(test) == TINY.test_sites * per_site
        assert set(test.site.tolist()) == set(range(TINY.test_sites))
        assert _same(test, sets[10])
    assert len(registry.load_test_set(_experiment(3))) == 3 * per_site  # fewer sites than test_sites
    fewer = registry.load_test_set(_experiment(100, data=replace(TINY, test_sites=4)))
    assert len(fewer) == 4 * per_site
    registry.clear_data_cache()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_test_sites_is_a_config_error_naming_the_key(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"data.test_sites="):
        DataConfig(test_sites=bad)  # type: ignore[arg-type]


# -- the server knows simulated nodes' partitions --------------------------------------------


def _simulated_grid(num_nodes: int) -> tuple[InMemoryGrid, dict[int, int]]:
    """A Grid over nodes registered by Flower's own simulation code; its node -> partition mapping."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    run = Run.create_empty(run_id=1234)
    run.primary_task_id = 5678
    run.federation_id = NOOP_FEDERATION_ID
    state = factory.state()  # as flwr.simulation.run_simulation._main_loop pre-registers a run
    state.run_ids[run.run_id] = RunRecord(run=run)  # type: ignore[attr-defined]
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)  # type: ignore[attr-defined]
    inner = InMemoryGrid(state_factory=factory)
    inner.set_run(run)
    return inner, _register_nodes(num_nodes, factory)


def test_simulated_nodes_are_ordered_by_flowers_own_partition_mapping_without_a_query(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inner, mapping = _simulated_grid(300)
    grid = PartitionOrderedGrid(inner, expected=300)

    def no_query(nodes: list[int]) -> None:
        raise AssertionError(f"asked {len(nodes)} nodes although the mapping is known")

    monkeypatch.setattr(grid, "_ask_partitions", no_query)
    ordered = grid.get_node_ids()
    assert [mapping[n] for n in ordered] == list(range(300))
    assert grid.partition_of == mapping and grid.queried == 0
    assert registration_order(inner) == sorted(mapping, key=mapping.__getitem__)


def test_a_federation_that_does_not_match_the_config_asks_its_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []

    def record(self: PartitionOrderedGrid, nodes: list[int]) -> None:
        asked.extend(nodes)
        raise RuntimeError("1 node(s) could not start: invalid num-partitions")

    monkeypatch.setattr(PartitionOrderedGrid, "_ask_partitions", record)
    inner, _ = _simulated_grid(6)
    with pytest.raises(RuntimeError, match="num-partitions"):  # more nodes than clients: ask at once
        PartitionOrderedGrid(inner, expected=4).get_node_ids()
    assert len(asked) == 6
    asked.clear()
    short = PartitionOrderedGrid(inner, expected=8)
    assert len(short.get_node_ids()) == 6 and not asked  # fewer: maybe still registering; the sampler waits
    monkeypatch.setattr(grid_module, "REGISTRATION_SETTLE_S", 0.0)
    with pytest.raises(RuntimeError, match="num-partitions"):  # ... until the count has settled short
        short.get_node_ids()


def test_a_deployed_grid_has_no_registration_order() -> None:
    assert registration_order(object()) is None  # type: ignore[arg-type]  # e.g. Flower's GrpcGrid


# -- Flower's per-node costs, worked around (simulations.flower_patches) ---------------------


def test_one_pass_polling_hands_out_what_flowers_per_node_loop_does() -> None:
    inner, mapping = _simulated_grid(50)
    state = inner.state
    nodes = list(mapping)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, inner.run.run_id, SUPERLINK_NODE_ID
    # two messages for some nodes, one for others, one already delivered: Flower hands out one per node
    targets = [nodes[3], nodes[3], nodes[40], nodes[7], nodes[0], nodes[40], nodes[12]]
    inner.push_messages([Message(RecordDict(), node, "train") for node in targets])
    state.get_message_ins(node_id=nodes[12], limit=1)
    rank = {node: i for i, node in enumerate(nodes)}
    for _ in range(3):  # sweep after sweep, until nothing is left to hand out
        ours = poll_once(state, rank)
        for msg in ours:  # undo, then let Flower's own loop take the same sweep
            msg.metadata.delivered_at = ""
        theirs = [m for node in nodes for m in state.get_message_ins(node_id=node, limit=1)]
        assert [m.metadata.message_id for m in ours] == [m.metadata.message_id for m in theirs]
    assert poll_once(state, rank) == []


def test_flower_patches_fuse_the_config_once_and_restore_flower() -> None:
    from flwr.compat.client import run_info_store
    from flwr.server.superlink.fleet.vce import vce_api

    from simulations.launch import PROJECT_ROOT

    before = (vce_api.add_messages_to_queue, run_info_store.get_fused_config_from_dir)
    override = {"federation.num_clients": 7}
    expected = before[1](PROJECT_ROOT, override)
    with flower_patches():
        fused = run_info_store.get_fused_config_from_dir(PROJECT_ROOT, override)
        again = run_info_store.get_fused_config_from_dir(PROJECT_ROOT, override)
        assert fused == again == expected and fused is not again  # each node its own copy
        assert vce_api.add_messages_to_queue is not before[0]
    assert (vce_api.add_messages_to_queue, run_info_store.get_fused_config_from_dir) == before


def test_the_end_of_a_run_builds_no_training_data(built: list[tuple[int, int]], tmp_path: Path) -> None:
    """The model bundle written after the last round reads the layout from the held-out set."""
    cfg = _experiment(10_000)
    test = registry.load_test_set(cfg)
    before = set(built)
    model = build_model_for(cfg, test)
    path = write_run_bundle(tmp_path / "model.fedmer", cfg, model.state_dict(), {"uar": 0.5})
    assert path is not None and path.exists()
    assert set(built) == before, "no person generated after the held-out set"


def test_a_seed_samples_the_same_clients_whatever_else_draws_from_pythons_random() -> None:
    """Ray draws from the module-level ``random`` while round 1 is sampled; the sampler does not care."""
    inner, _ = _simulated_grid(50)
    grid = PartitionOrderedGrid(inner, expected=50)
    with own_sampler(3):
        quiet = [sample_nodes(grid, 0, 5)[0] for _ in range(3)]
    with own_sampler(3):
        busy = []
        for _ in range(3):
            random.getrandbits(8)  # as ray.init does, from another thread, at any moment
            busy.append(sample_nodes(grid, 0, 5)[0])
    assert busy == quiet and strategy_utils.random is random


def test_a_checkpoint_carries_the_samplers_state() -> None:
    with own_sampler(11):
        SAMPLER.random()
        saved = capture_rng()
        expected = [SAMPLER.random() for _ in range(3)]
        SAMPLER.seed(99)
        restore_rng(saved)
        assert [SAMPLER.random() for _ in range(3)] == expected
        old = {k: v for k, v in saved.items() if k != "sampler"}  # written before the sampler existed
        restore_rng(old)
        assert SAMPLER.getstate() == random.getstate()


# -- replies are pulled at FedMER's pace, not Flower's fixed sleep ---------------------------


def _answer_later(state: object, nodes: list[int], delay: float) -> threading.Thread:
    """A thread that, after ``delay`` s, delivers each node's message and stores its reply as the
    simulation runtime's worker does (``vce_api.worker``: a reply with a fresh message id)."""

    def answer() -> None:
        time.sleep(delay)
        for node in nodes:
            for msg in state.get_message_ins(node_id=node, limit=1):  # type: ignore[attr-defined]
                reply = Message(RecordDict(), reply_to=msg)
                reply.metadata.__dict__["_message_id"] = str(uuid4())
                state.store_message_res(reply)  # type: ignore[attr-defined]

    thread = threading.Thread(target=answer)
    thread.start()
    return thread


def test_send_and_receive_pulls_every_reply_at_the_in_memory_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inner, mapping = _simulated_grid(4)
    nodes = list(mapping)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, inner.run.run_id, SUPERLINK_NODE_ID
    grid = PartitionOrderedGrid(inner, expected=4)
    assert grid.pull_interval == grid_module.PULL_INTERVAL_S["in-memory"] < inner.pull_interval
    pulls: list[int] = []
    pull = inner.pull_messages
    monkeypatch.setattr(inner, "pull_messages", lambda ids: pulls.append(len(ids)) or pull(ids))
    sent = [Message(RecordDict(), node, "train") for node in nodes]
    answering = _answer_later(inner.state, nodes, 0.3)
    replies = list(grid.send_and_receive(sent, timeout=30))
    answering.join()
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(
        m.metadata.message_id for m in sent
    )
    # pulled while waiting far more often than Flower's 0.1 s would (3 pulls in 0.3 s), then stopped
    assert len(pulls) > 6 and pulls[-1] > 0


def test_send_and_receive_returns_what_arrived_when_the_timeout_passes() -> None:
    inner, mapping = _simulated_grid(3)
    nodes = list(mapping)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, inner.run.run_id, SUPERLINK_NODE_ID
    grid = PartitionOrderedGrid(inner, expected=3)
    answering = _answer_later(inner.state, nodes[:1], 0.1)  # one node answers, two never do
    t0 = time.monotonic()
    replies = list(grid.send_and_receive([Message(RecordDict(), n, "train") for n in nodes], timeout=0.5))
    answering.join()
    assert len(replies) == 1 and replies[0].metadata.src_node_id == nodes[0]
    assert 0.5 <= time.monotonic() - t0 < 5.0


def test_a_grid_other_than_the_simulations_pulls_at_the_remote_interval() -> None:
    assert PartitionOrderedGrid(NodeListGrid([1, 2])).pull_interval == grid_module.PULL_INTERVAL_S["remote"]
    assert grid_module.PULL_INTERVAL_S["remote"] < 3.0  # Flower's HttpGrid sleeps 3 s between pulls
