"""Client-level DP: Flower's wrappers chosen from config, accounted, and clipping on the way out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import strategy as fs
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedmer import records as rk
from fedmer.config import ConfigError, ExperimentConfig
from fedmer.federation.strategies import build_strategy
from fedmer.privacy.client_level import client_level_epsilon, client_noise_multiplier
from fedmer.privacy.clipping import update_norm
from tests.conftest import NodeListGrid

SMALL = {
    "data.persons_per_site": 2,
    "data.sequences_per_person": 16,
    "federation.num_clients": 3,
    "federation.batch_size": 16,
}


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def _cfg(**overrides: object) -> ExperimentConfig:
    return ExperimentConfig.from_run_config(ExperimentConfig().to_run_config() | SMALL | overrides)


@pytest.mark.parametrize(
    ("clipping", "side", "cls"),
    [
        ("fixed", "server", fs.DifferentialPrivacyServerSideFixedClipping),
        ("fixed", "client", fs.DifferentialPrivacyClientSideFixedClipping),
        ("adaptive", "server", fs.DifferentialPrivacyServerSideAdaptiveClipping),
        ("adaptive", "client", fs.DifferentialPrivacyClientSideAdaptiveClipping),
    ],
)
def test_config_chooses_flowers_wrapper(clipping: str, side: str, cls: type) -> None:
    cfg = _cfg(
        **{
            "privacy.mode": "client",
            "privacy.client_clipping": clipping,
            "privacy.client_clipping_side": side,
            "federation.num_clients": 20,  # adaptive clipping splits noise off for the clipped count
        }
    )
    strategy = build_strategy(cfg).inner
    assert type(strategy) is cls and type(strategy.strategy) is fs.FedAvg
    assert (getattr(strategy, "accountant", None) is not None) == (clipping == "fixed")


def test_adaptive_clipping_with_too_few_clients_is_a_config_error() -> None:
    cfg = _cfg(**{"privacy.mode": "client", "privacy.client_clipping": "adaptive"})
    with pytest.raises(ConfigError, match=r"privacy.client_noise_multiplier=1.0.*3 clients per round"):
        build_strategy(cfg)


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_client_dp_rejects_robust_aggregators_and_says_why(clipping: str) -> None:
    with pytest.raises(ConfigError, match=r"strategy.name='fedmedian'.*fedavg, fedavgm, fedprox.*not means"):
        _cfg(**{"privacy.mode": "client", "strategy.name": "fedmedian", "privacy.client_clipping": clipping})


@pytest.mark.parametrize(("name", "cls"), [("fedavgm", fs.FedAvgM), ("fedyogi", fs.FedYogi)])
def test_server_optimizer_runs_on_the_noised_average(name: str, cls: type) -> None:
    """Composition: Flower's accounted DP wrapper around plain FedAvg, the optimizer above it."""
    strategy = build_strategy(_cfg(**{"privacy.mode": "client", "strategy.name": name})).inner
    assert isinstance(strategy, cls) and type(strategy).__name__ == f"DP{cls.__name__}"
    assert type(strategy.dp) is fs.DifferentialPrivacyServerSideFixedClipping
    assert type(strategy.dp.strategy) is fs.FedAvg and strategy.dp.accountant is not None


def _weighted_reply(pid: int, value: float, node: int) -> Message:
    ask = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node)
    metrics = MetricRecord({rk.CLIENT_WEIGHT: 1, rk.NUM_EXAMPLES: 10 + pid, rk.PARTITION_ID: pid})
    arrays = ArrayRecord([np.full(4, value, dtype=np.float32)])
    return Message(content=RecordDict({rk.ARRAYS: arrays, rk.METRICS: metrics}), reply_to=ask)


def test_dp_fedavgm_equals_momentum_step_on_the_dp_release() -> None:
    """Same seed: DP-FedAvgM's model = current + server_lr * (DP wrapper's release - current).

    So the noise is added before the server step (what the accountant assumes), not after.
    """
    overrides = {"privacy.mode": "client", "strategy.name": "fedavgm", "privacy.client_noise_multiplier": 0.7}
    cfg = _cfg(**overrides)
    current = ArrayRecord([np.zeros(4, dtype=np.float32)])
    replies = [_weighted_reply(i, v, 10 + i) for i, v in enumerate([0.5, 2.0, -1.0])]
    grid = NodeListGrid([10, 11, 12])

    composed = build_strategy(cfg).inner
    list(composed.configure_train(1, current, ConfigRecord(), grid))
    np.random.seed(3)
    new, _ = composed.aggregate_train(1, [Message(r.content, reply_to=r) for r in replies])

    dp_alone = build_strategy(_cfg(**{**overrides, "strategy.name": "fedavg"})).inner
    list(dp_alone.configure_train(1, current, ConfigRecord(), grid))
    np.random.seed(3)
    release, _ = dp_alone.aggregate_train(1, [Message(r.content, reply_to=r) for r in replies])

    lr = cfg.strategy.server_lr
    expected = lr * release.to_numpy_ndarrays()[0]  # current is 0; first momentum = pseudo-gradient
    np.testing.assert_allclose(new.to_numpy_ndarrays()[0], expected, rtol=1e-6)
    clean_mean = np.mean([0.5, 2.0, -1.0])  # every update's norm is under the clip (5)
    assert not np.allclose(release.to_numpy_ndarrays()[0], clean_mean)  # noise was really added
    eps = client_level_epsilon(composed)
    assert eps is not None and eps > 0 and eps == pytest.approx(client_level_epsilon(dp_alone))


@pytest.mark.parametrize("target", [0.5, 1.0, 4.0, 8.0])
def test_auto_client_noise_meets_the_target_by_flowers_and_an_independent_accountant(target: float) -> None:
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    cfg = _cfg(
        **{
            "privacy.mode": "client",
            "privacy.client_noise_multiplier": "auto",
            "privacy.target_epsilon": target,
            "federation.num_rounds": 12,
        }
    )
    sigma = client_noise_multiplier(cfg)
    acc = RdpAccountant()
    acc.compose(SelfComposedDpEvent(GaussianDpEvent(sigma), 12))
    eps = acc.get_epsilon(cfg.privacy.delta)
    assert target * 0.99 <= eps <= target * (1 + 1e-6)  # tight: no wasted budget, never over
    looser = _cfg(**{**cfg.to_run_config(), "privacy.target_epsilon": target * 2})
    assert client_noise_multiplier(looser) < sigma


def test_infinite_target_means_clipping_without_noise_reported_as_inf() -> None:
    import math

    cfg = _cfg(**{"privacy.mode": "client", "privacy.client_noise_multiplier": "auto"})
    cfg = _cfg(**{**cfg.to_run_config(), "privacy.target_epsilon": math.inf})
    strategy = build_strategy(cfg).inner
    assert strategy.noise_multiplier == 0.0 and strategy.accountant is None
    assert client_level_epsilon(strategy) == math.inf
    with pytest.raises(ConfigError, match=r"privacy.client_noise_multiplier='auto'.*fixed"):
        _cfg(
            **{
                "privacy.mode": "client",
                "privacy.client_noise_multiplier": "auto",
                "privacy.client_clipping": "adaptive",
            }
        )


def test_client_side_clipping_mod_clips_the_outgoing_message(tmp_path: Path) -> None:
    """The whole ClientApp (with its mods) under client-side fixed clipping at norm 0.01."""
    from client.app import app
    from fedmer.data.registry import load_client_dataset
    from fedmer.models import build_model

    cfg = _cfg(
        **{
            "privacy.mode": "both",
            "privacy.client_clipping_side": "client",
            "privacy.reply_metrics": "monitoring",  # the pre-clipping norm, to compare with
        }
    )
    data = load_client_dataset(cfg, 0)
    torch.manual_seed(0)
    state = build_model(cfg.model, data.feature_slices, data.num_classes).state_dict()
    config = ConfigRecord({rk.SERVER_ROUND: 1, rk.LR: 0.1, rk.LOCAL_EPOCHS: 1, KEY_CLIPPING_NORM: 0.01})
    msg = Message(
        RecordDict({rk.ARRAYS: ArrayRecord(state), rk.CONFIG: config}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    flat = cfg.to_run_config() | {"output.dir": str(tmp_path)}  # a fresh ledger every run
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config=flat,
    )
    reply = app(msg, context)
    assert not reply.has_error(), reply.error
    sent = reply.content[rk.ARRAYS].to_torch_state_dict()
    assert reply.content[rk.METRICS][rk.UPDATE_NORM] > 0.01  # the raw update was larger ...
    assert update_norm(sent, state) <= 0.01 * (1 + 1e-5)  # ... what left is within Flower's norm
