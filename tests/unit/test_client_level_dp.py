"""Client-level DP: Flower's wrappers chosen from config, accounted, and clipping on the way out."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import strategy as fs
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedmer import records as rk
from fedmer.config import ConfigError, ExperimentConfig
from fedmer.privacy.clipping import update_norm
from fedmer.strategies import build_strategy

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


def test_accounted_client_dp_needs_fedavg_aggregation_and_says_what_to_change() -> None:
    with pytest.raises(
        ConfigError, match=r"strategy.name='fedyogi'.*fedavg, fedprox.*client_clipping=adaptive"
    ):
        _cfg(**{"privacy.mode": "client", "strategy.name": "fedyogi"})
    assert _cfg(**{"privacy.mode": "both", "strategy.name": "fedyogi", "privacy.client_clipping": "adaptive"})


def test_client_side_clipping_mod_clips_the_outgoing_message() -> None:
    """The whole ClientApp (with its mods) under client-side fixed clipping at norm 0.01."""
    from client.app import app
    from fedmer.data.registry import load_client_dataset
    from fedmer.models import build_model

    cfg = _cfg(**{"privacy.mode": "both", "privacy.client_clipping_side": "client"})
    data = load_client_dataset(cfg, 0)
    torch.manual_seed(0)
    state = build_model(cfg.model, data.feature_slices, data.num_classes).state_dict()
    config = ConfigRecord({rk.SERVER_ROUND: 1, rk.LR: 0.1, rk.LOCAL_EPOCHS: 1, KEY_CLIPPING_NORM: 0.01})
    msg = Message(
        RecordDict({rk.ARRAYS: ArrayRecord(state), rk.CONFIG: config}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    flat = cfg.to_run_config() | {"output.dir": "/tmp/fedmer-test-client-level"}
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
