"""Modality-aware FedAvg: encoders average over the clients that hold their modality."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmer import records as rk
from fedmer.federation.modality_aware import ModalityAwareFedAvg, modality_weighted_average


def _reply(value: float, n: int, counts: list[int]) -> RecordDict:
    arrays = ArrayRecord(
        {
            "encoders.0.w": Array(np.full(2, value)),
            "encoders.1.w": Array(np.full(2, value)),
            "fusion.w": Array(np.full(2, value)),
        }
    )
    metrics = MetricRecord(
        {rk.NUM_EXAMPLES: n, **{rk.modality_count_key(i): c for i, c in enumerate(counts)}}
    )
    return RecordDict({rk.ARRAYS: arrays, rk.METRICS: metrics})


def test_a_site_without_a_modality_does_not_pull_its_encoder() -> None:
    glob = ArrayRecord({k: Array(np.zeros(2)) for k in ("encoders.0.w", "encoders.1.w", "fusion.w")})
    # site A: 10 samples, both modalities; site B: 30 samples, no camera (modality 1)
    out = modality_weighted_average(
        [_reply(1.0, 10, [10, 10]), _reply(3.0, 30, [30, 0])], rk.NUM_EXAMPLES, glob
    )
    assert out["fusion.w"].numpy() == pytest.approx([2.5, 2.5])  # shared: FedAvg's weights 10:30
    assert out["encoders.0.w"].numpy() == pytest.approx([2.5, 2.5])  # both hold speech
    assert out["encoders.1.w"].numpy() == pytest.approx([1.0, 1.0])  # only A holds the face


def test_a_modality_nobody_holds_keeps_the_global_weights() -> None:
    glob = ArrayRecord({k: Array(np.full(2, 7.0)) for k in ("encoders.0.w", "encoders.1.w", "fusion.w")})
    out = modality_weighted_average(
        [_reply(1.0, 10, [10, 0]), _reply(3.0, 30, [30, 0])], rk.NUM_EXAMPLES, glob
    )
    assert out["encoders.1.w"].numpy() == pytest.approx([7.0, 7.0])


@given(st.lists(st.tuples(st.floats(-5, 5), st.integers(1, 100)), min_size=1, max_size=6))
@settings(max_examples=50, deadline=None)
def test_with_every_modality_everywhere_it_is_fedavg(sites: list[tuple[float, int]]) -> None:
    replies = [_reply(v, n, [n, n]) for v, n in sites]
    out = modality_weighted_average(replies, rk.NUM_EXAMPLES, None)
    expected = sum(v * n for v, n in sites) / sum(n for _, n in sites)
    for key in ("encoders.0.w", "encoders.1.w", "fusion.w"):
        assert out[key].numpy() == pytest.approx([expected] * 2, abs=1e-9)


def test_the_strategy_asks_nodes_for_their_counts() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from tests.conftest import NodeListGrid

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # Messages need a run

    strategy = ModalityAwareFedAvg(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
    arrays = ArrayRecord({"encoders.0.w": Array(np.zeros(2))})
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), NodeListGrid([1, 2])))
    assert all(m.content[rk.CONFIG][rk.WANT_MODALITY_COUNTS] for m in sent)
