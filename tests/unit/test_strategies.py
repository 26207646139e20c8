"""Strategy registry and the accounting wrapper: failures surface, order is fixed."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import strategy as fs

from fedmer import records as rk
from fedmer.config import ConfigError, ExperimentConfig, StrategyConfig
from fedmer.federation.strategies import (
    STRATEGY_REGISTRY,
    AccountedStrategy,
    build_strategy,
    register_strategy,
)
from tests.conftest import NodeListGrid


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages need the ids a running ServerApp would have set."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def _cfg(name: str) -> ExperimentConfig:
    return ExperimentConfig(strategy=StrategyConfig(name=name))


def test_a_registered_strategy_is_a_valid_config_value_without_a_second_list() -> None:
    """The config accepts what the registry holds: nothing else to edit when adding one."""
    with pytest.raises(ConfigError, match=r"strategy.name='fedmine'.*fedavg"):
        StrategyConfig(name="fedmine")
    register_strategy("fedmine")(lambda cfg, common: fs.FedAvg(**common))
    try:
        assert type(build_strategy(_cfg("fedmine")).inner).__name__ == "FedAvg"
    finally:
        STRATEGY_REGISTRY._entries.pop("fedmine")  # other tests see the built-ins only
    with pytest.raises(ConfigError):
        StrategyConfig(name="fedmine")


def test_every_registered_strategy_builds_flowers_class() -> None:
    expected = {
        "fedavg": "FedAvg",
        "fedprox": "FedProx",
        "fedadam": "FedAdam",
        "fedyogi": "FedYogi",
        "fedadagrad": "FedAdagrad",
        "fedavgm": "FedAvgM",
        "fedmedian": "FedMedian",
        "fedtrimmedavg": "FedTrimmedAvg",
        "krum": "Krum",
        "multikrum": "MultiKrum",
        "bulyan": "Bulyan",
        "fedavg_modality": "ModalityAwareFedAvg",  # FedMER's own: a subclass of Flower's FedAvg
    }
    assert set(expected) == set(STRATEGY_REGISTRY.names())
    for name, cls in expected.items():
        strategy = build_strategy(_cfg(name))
        assert isinstance(strategy, AccountedStrategy)
        assert type(strategy.inner).__name__ == cls
        assert isinstance(strategy.inner, fs.FedAvg if name == "fedavg_modality" else fs.Strategy)
        flower = type(strategy.inner).__module__.startswith("flwr.serverapp.strategy")
        assert flower or name == "fedavg_modality"


def test_a_strategy_that_makes_no_model_keeps_the_old_one_and_says_so() -> None:
    """Bulyan below 4f + 3 replies returns nothing: the round must record it, not look healthy."""
    strategy = AccountedStrategy(fs.Bulyan(num_malicious_nodes=2), update_bound=5.0)
    _sent(strategy, 1)
    arrays, _ = strategy.aggregate_train(1, [_reply(i, 0.1 * i, 0.5, 10 * (i + 1)) for i in range(5)])
    assert arrays is None
    why = strategy.rounds[1].aggregate_rejected
    assert why is not None and why.startswith("Bulyan made no model from 5 accepted update(s)")


def _reply(pid: int, value: float, eps: float, node: int) -> Message:
    ask = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node)
    arrays = ArrayRecord([np.full(3, value, dtype=np.float32)])
    metrics = MetricRecord(
        {
            rk.NUM_EXAMPLES: 10,
            rk.CLIENT_WEIGHT: 1,
            rk.EPSILON: eps,
            rk.PARTITION_ID: pid,
            rk.TRAIN_LOSS: 1.0,
            rk.UPDATE_NORM: 0.5,
            rk.UPDATE_CLIPPED: 0,
        }
    )
    reply = Message(content=RecordDict({rk.ARRAYS: arrays, rk.METRICS: metrics}), reply_to=ask)
    return reply


def _failure(node: int, reason: str) -> Message:
    ask = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node)
    reply = Message(Error(code=0, reason=reason), reply_to=ask)
    return reply


def test_failures_are_recorded_and_max_epsilon_kept() -> None:
    strategy = build_strategy(_cfg("fedavg"))
    replies = [_reply(2, 3.0, 1.5, 30), _failure(99, "ValueError: boom"), _reply(0, 1.0, 0.5, 10)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    report = strategy.rounds[1]
    assert report.failures == ["node 99: ValueError: boom"]
    assert [c[rk.PARTITION_ID] for c in report.clients] == [0, 2]  # partition order
    assert max(report.epsilons()) == 1.5
    assert metrics is not None and metrics[rk.EPSILON] == pytest.approx(1.0)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(3, 2.0))


def test_a_round_where_every_client_fails_stops_the_run() -> None:
    strategy = build_strategy(_cfg("fedavg"))
    with pytest.raises(RuntimeError, match="no sampled client trained.*2 failed.*FloatingPointError"):
        strategy.aggregate_train(1, [_failure(1, "FloatingPointError: loss nan"), _failure(2, "x")])


def test_aggregation_is_independent_of_reply_order() -> None:
    replies = [_reply(i, float(v), 1.0, 100 + i) for i, v in enumerate([0.1, 0.7, 0.3, 1e-3, 5.0])]
    a, _ = build_strategy(_cfg("fedavg")).aggregate_train(1, replies)
    b, _ = build_strategy(_cfg("fedavg")).aggregate_train(1, list(reversed(replies)))
    assert np.array_equal(a.to_numpy_ndarrays()[0], b.to_numpy_ndarrays()[0])


def test_budget_refusals_are_told_apart_from_failures() -> None:
    from fedmer.privacy.ledger import BudgetExceeded

    strategy = build_strategy(_cfg("fedavg"))
    refusal = _failure(5, f"ClientAppException: {BudgetExceeded('client-4', 7.9, 8.3, 8.0, 1e-5)}")
    strategy.aggregate_train(1, [_reply(0, 1.0, 0.5, 10), refusal])
    report = strategy.rounds[1]
    assert report.failures == [] and len(report.refusals) == 1
    assert "would reach epsilon 8.3" in report.refusals[0] and "cap of 8" in report.refusals[0]


def _sent(strategy: AccountedStrategy, server_round: int, value: float = 0.0) -> ArrayRecord:
    """configure_train with a global model of three ``value`` entries (what the guard measures against)."""
    arrays = ArrayRecord([np.full(3, value, dtype=np.float32)])
    strategy.configure_train(server_round, arrays, ConfigRecord(), NodeListGrid(list(range(10, 110, 10))))
    return arrays


def test_a_nan_update_is_rejected_named_and_never_averaged_in() -> None:
    strategy = build_strategy(_cfg("fedavg"))
    _sent(strategy, 1)
    replies = [_reply(0, 1.0, 0.5, 10), _reply(1, float("nan"), 0.5, 20), _reply(2, 2.5, 0.5, 30)]
    arrays, _ = strategy.aggregate_train(1, replies)
    report = strategy.rounds[1]
    assert report.rejections == ["node 20: non-finite values in 0"]
    assert [c[rk.PARTITION_ID] for c in report.clients] == [0, 2]
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(3, 1.75))  # mean of the two others


def test_a_scaled_sign_flipped_update_is_rejected_by_the_norm_the_server_measures() -> None:
    """The attacker reports update_norm 0.5; the server measures 1000 * sqrt(3) against C = 5."""
    strategy = build_strategy(_cfg("fedavg"))
    _sent(strategy, 1)
    replies = [_reply(0, 1.0, 0.5, 10), _reply(1, -1000.0, 0.5, 20)]
    arrays, _ = strategy.aggregate_train(1, replies)
    (why,) = strategy.rounds[1].rejections
    assert why.startswith("node 20: update norm 1732 (measured by the server) exceeds the clip bound C=5")
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(3, 1.0))


def test_wrong_shapes_keys_and_weights_are_rejected() -> None:
    strategy = build_strategy(_cfg("fedavg"))
    _sent(strategy, 1)
    wrong_shape = _reply(1, 1.0, 0.5, 20)
    wrong_shape.content[rk.ARRAYS] = ArrayRecord([np.zeros(4, dtype=np.float32)])
    bad_weight = _reply(2, 1.0, 0.5, 30)
    bad_weight.content[rk.METRICS][rk.CLIENT_WEIGHT] = float("inf")  # the weight under DP's minimal replies
    strategy.aggregate_train(1, [_reply(0, 1.0, 0.5, 10), wrong_shape, bad_weight])
    reasons = strategy.rounds[1].rejections
    assert reasons[0] == "node 20: shape of 0 is (4,), the global model's is (3,)"
    assert reasons[1].startswith("node 30: aggregation weight client-weight=inf is not a finite number")


def test_when_every_reply_is_rejected_the_run_stops_and_says_why() -> None:
    strategy = build_strategy(_cfg("fedavg"))
    _sent(strategy, 1)
    with pytest.raises(RuntimeError, match="no sampled client trained.*2 rejected.*non-finite"):
        strategy.aggregate_train(1, [_reply(0, float("nan"), 0.5, 10), _reply(1, float("inf"), 0.5, 20)])


def test_a_non_finite_aggregate_is_never_applied() -> None:
    """A real Flower strategy whose server step overflows: the round keeps the previous model."""
    inner = fs.FedAvgM(server_learning_rate=float("inf"), server_momentum=0.0)
    strategy = AccountedStrategy(inner, update_bound=5.0)
    _sent(strategy, 1)
    arrays, _ = strategy.aggregate_train(1, [_reply(0, 1.0, 0.5, 10), _reply(1, 2.0, 0.5, 20)])
    assert arrays is None  # Flower's Strategy.start then keeps the previous global arrays
    assert (
        strategy.rounds[1].aggregate_rejected == "non-finite aggregate in 0: kept the previous global model"
    )
