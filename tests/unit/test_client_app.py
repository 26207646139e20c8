"""The ClientApp's train/evaluate/query handlers, called with real Flower Messages."""

from __future__ import annotations

import math
import tempfile

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedmer import records as rk
from fedmer.config import ConfigError, ExperimentConfig
from fedmer.data.registry import load_client_dataset
from fedmer.models import build_model
from fedmer.privacy.clipping import update_norm
from fedmer.privacy.engine import PrivacyHistory, compute_epsilon
from fedmer.privacy.statement import privacy_statement

FLAT = ExperimentConfig().to_run_config() | {
    "data.persons_per_site": 2,
    "data.sequences_per_person": 16,
    "federation.num_clients": 3,
    "federation.batch_size": 16,
    "privacy.update_clip_norm": 0.05,  # small enough that every update is clipped
    "output.dir": tempfile.mkdtemp(prefix="fedmer-client-test-"),  # simulation ledgers land here
}


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def _context(
    pid: int = 0,
    flat: dict | None = None,
    num_partitions: int = 3,
    run_id: int = 1,
    ledger: str | None = None,
) -> Context:
    node_config = {"partition-id": pid, "num-partitions": num_partitions}
    if ledger is not None:
        node_config["ledger-path"] = ledger
    return Context(
        run_id=run_id,
        node_id=pid + 1,
        node_config=node_config,
        state=RecordDict(),
        run_config=dict(flat or FLAT),
    )


def _global(flat: dict | None = None) -> dict[str, torch.Tensor]:
    cfg = ExperimentConfig.from_run_config(flat or FLAT)
    data = load_client_dataset(cfg, 0)
    torch.manual_seed(0)
    return build_model(cfg.model, data.feature_slices, data.num_classes).state_dict()


def _train_msg(state: dict[str, torch.Tensor], server_round: int) -> Message:
    config = ConfigRecord({rk.SERVER_ROUND: server_round, rk.LR: 0.1, rk.LOCAL_EPOCHS: 1})
    return Message(
        RecordDict({rk.ARRAYS: ArrayRecord(state), rk.CONFIG: config}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )


@pytest.mark.parametrize(
    ("mode", "reply_metrics", "declared"),
    [
        ("sample", "auto", rk.TRAIN_REPLY_METRICS_MINIMAL),  # the default under DP
        ("client", "auto", rk.TRAIN_REPLY_METRICS_MINIMAL),
        ("sample", "minimal", rk.TRAIN_REPLY_METRICS_MINIMAL),
        ("sample", "monitoring", rk.TRAIN_REPLY_METRICS),
        ("off", "auto", rk.TRAIN_REPLY_METRICS),  # without DP: monitoring
    ],
)
def test_outgoing_update_is_clipped_to_c_and_has_clean_keys(
    mode: str, reply_metrics: str, declared: frozenset[str]
) -> None:
    """Only what README's "What leaves a node" lists for the mode leaves the node."""
    from client.app import train

    flat = FLAT | {"privacy.mode": mode, "privacy.reply_metrics": reply_metrics}
    state = _global(flat)
    reply = train(_train_msg(state, 1), _context(flat=flat))
    # only what is declared leaves the node: the model's own arrays and the declared metrics
    assert set(reply.content.keys()) == {rk.ARRAYS, rk.METRICS}
    sent = reply.content[rk.ARRAYS].to_torch_state_dict()
    assert set(sent) == set(state) and not any("_module." in k for k in sent)
    assert all(sent[k].shape == state[k].shape for k in state)
    assert update_norm(sent, state) <= 0.05
    metrics = reply.content[rk.METRICS]
    assert set(metrics.keys()) == declared
    # the run's privacy statement (config.json, summary.json) lists exactly what was sent
    statement = privacy_statement(ExperimentConfig.from_run_config(flat))
    assert (
        set(statement["sent_in_clear"]["train"]) == declared and "evaluate" not in statement["sent_in_clear"]
    )
    assert metrics[rk.DELTA] == 1e-5 and metrics[rk.CLIENT_WEIGHT] == 1
    if declared == rk.TRAIN_REPLY_METRICS:
        assert metrics[rk.UPDATE_CLIPPED] == 1 and metrics[rk.UPDATE_NORM] > 0.05
        assert metrics[rk.NUM_EXAMPLES] == len(load_client_dataset(ExperimentConfig.from_run_config(flat), 0))


def test_epsilon_accumulates_in_context_state_and_never_resets() -> None:
    from client.app import train

    context, state = _context(), _global()
    eps, steps = [], []
    for rnd in (1, 2, 3):
        metrics = train(_train_msg(state, rnd), context).content[rk.METRICS]
        eps.append(metrics[rk.EPSILON])
        steps.append(metrics[rk.STEPS])
    assert 0 < eps[0] < eps[1] < eps[2] <= 8.0
    assert steps[0] < steps[1] < steps[2]
    history = PrivacyHistory.from_lists(dict(context.state[rk.PRIVACY_STATE]))
    assert history.steps == steps[2]
    assert compute_epsilon(history, 1e-5) == pytest.approx(eps[2])
    # a node that was not sampled has spent nothing
    assert rk.PRIVACY_STATE not in _context(pid=1).state


def test_non_private_mode_reports_infinite_epsilon() -> None:
    from client.app import train

    flat = FLAT | {"privacy.mode": "off"}
    metrics = train(_train_msg(_global(flat), 1), _context(flat=flat)).content[rk.METRICS]
    assert math.isinf(metrics[rk.EPSILON]) and metrics[rk.NOISE_MULTIPLIER] == 0.0


def test_nan_weights_make_the_client_fail_loudly() -> None:
    from client.app import train

    state = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in _global().items()}
    with pytest.raises(FloatingPointError, match="training loss became nan"):
        train(_train_msg(state, 1), _context())


def test_wrong_federation_size_is_refused_with_a_fix() -> None:
    from client.app import query

    msg = Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY)
    with pytest.raises(ConfigError, match=r"num-partitions=5.*federation.num_clients=3"):
        query(msg, _context(num_partitions=5))
    with pytest.raises(ConfigError, match="partition-id=7"):
        query(msg, _context(pid=7))
    assert query(msg, _context(pid=2)).content[rk.METRICS][rk.PARTITION_ID] == 2


def test_evaluate_reports_loss_and_accuracy() -> None:
    from client.app import evaluate

    msg = Message(
        RecordDict({rk.ARRAYS: ArrayRecord(_global()), rk.CONFIG: ConfigRecord()}),
        dst_node_id=1,
        message_type=MessageType.EVALUATE,
    )
    reply = evaluate(msg, _context())
    assert set(reply.content.keys()) == {rk.METRICS}
    metrics = reply.content[rk.METRICS]
    assert set(metrics.keys()) == rk.EVALUATE_REPLY_METRICS
    assert 0.0 <= metrics[rk.EVAL_ACCURACY] <= 1.0 and metrics[rk.EVAL_LOSS] > 0


def test_ledger_carries_spend_across_runs_and_enforces_the_cap(tmp_path) -> None:
    from client.app import train
    from fedmer.privacy.ledger import BudgetExceeded, read_ledger

    ledger = str(tmp_path / "node.json")
    state = _global()
    first = train(_train_msg(state, 1), _context(run_id=101, ledger=ledger)).content[rk.METRICS]
    second = train(_train_msg(state, 1), _context(run_id=102, ledger=ledger)).content[rk.METRICS]
    # each run's own epsilon starts afresh; the node's lifetime spend does not
    assert second[rk.EPSILON] == pytest.approx(first[rk.EPSILON])
    assert second[rk.EPSILON_LIFETIME] > first[rk.EPSILON_LIFETIME] == pytest.approx(first[rk.EPSILON])
    on_disk = read_ledger(ledger)
    assert on_disk.spent() == pytest.approx(second[rk.EPSILON_LIFETIME])
    assert {e.run_id for e in on_disk.entries} == {"101", "102"}

    capped = FLAT | {"privacy.budget_cap": second[rk.EPSILON_LIFETIME] * 1.01}
    with pytest.raises(BudgetExceeded, match="privacy budget exceeded: node 'client-0' would reach"):
        train(_train_msg(state, 1), _context(run_id=103, ledger=ledger, flat=capped))
    assert read_ledger(ledger).spent() == pytest.approx(on_disk.spent())  # refusal spent nothing


def _stats_query() -> Message:
    config = ConfigRecord({rk.QUERY: rk.QUERY_FEATURE_STATS})
    return Message(RecordDict({rk.CONFIG: config}), dst_node_id=1, message_type=MessageType.QUERY)


def test_statistics_release_is_paid_for_before_it_leaves_and_counted_in_training(tmp_path) -> None:
    """data.standardize=federated under DP-SGD: ledger first, then noised sums; epsilon includes it."""
    from client.app import query, train
    from fedmer.privacy.ledger import read_ledger
    from fedmer.privacy.run_noise import dp_sgd_noise, stats_noise_multiplier

    flat = FLAT | {"data.standardize": "federated", "output.dir": str(tmp_path)}
    cfg = ExperimentConfig.from_run_config(flat)
    context = _context(flat=flat)
    reply = query(_stats_query(), context)
    sigma = stats_noise_multiplier(cfg)
    assert sigma > 0 and reply.content[rk.METRICS][rk.STATS_NOISE_MULTIPLIER] == sigma
    sent = reply.content[rk.STATS].to_torch_state_dict()
    assert set(sent) == {*rk.STATS_SUMS, rk.STATS_COUNT}
    ledger = read_ledger(tmp_path / "ledgers" / "client-0.json")
    assert ledger.history.entries == ((sigma, 1.0, 1),)
    history = PrivacyHistory.from_lists(dict(context.state[rk.PRIVACY_STATE]))
    assert history.entries == ((sigma, 1.0, 1),)
    # the noised sums differ from the exact ones by the accounted noise scale
    data = load_client_dataset(cfg, 0)
    from fedmer.data.feature_stats import local_release

    exact = local_release(data, clip_norm=cfg.privacy.stats_clip_norm, noise_multiplier=0.0, rng=None)
    noise = np.concatenate([sent[k].numpy() for k in rk.STATS_SUMS]) - np.concatenate(
        [getattr(exact, k) for k in rk.STATS_SUMS]
    )
    assert noise.std() == pytest.approx(sigma * math.sqrt(2) * cfg.privacy.stats_clip_norm, rel=0.25)

    torch.manual_seed(0)
    state = build_model(cfg.model, data.feature_slices, data.num_classes, standardize=True).state_dict()
    metrics = train(_train_msg(state, 1), context).content[rk.METRICS]
    assert metrics[rk.NOISE_MULTIPLIER] == dp_sgd_noise(cfg, len(data))
    full = PrivacyHistory.from_lists(dict(context.state[rk.PRIVACY_STATE]))
    assert full.entries[0] == (sigma, 1.0, 1) and len(full.entries) == 2
    assert metrics[rk.EPSILON] == pytest.approx(compute_epsilon(full, 1e-5))
    assert metrics[rk.EPSILON] > compute_epsilon(PrivacyHistory(full.entries[1:]), 1e-5)


def test_statistics_without_dp_are_exact_and_cost_nothing() -> None:
    from client.app import query
    from fedmer.data.feature_stats import local_release

    flat = FLAT | {"data.standardize": "federated", "privacy.mode": "off"}
    cfg = ExperimentConfig.from_run_config(flat)
    context = _context(flat=flat)
    sent = query(_stats_query(), context).content[rk.STATS].to_torch_state_dict()
    exact = local_release(load_client_dataset(cfg, 0), clip_norm=math.inf, noise_multiplier=0.0, rng=None)
    for key in rk.STATS_SUMS:
        np.testing.assert_array_equal(sent[key].numpy(), getattr(exact, key))
    assert rk.PRIVACY_STATE not in context.state


def test_a_statistics_query_to_a_run_without_standardisation_is_refused() -> None:
    from client.app import query

    with pytest.raises(ValueError, match="data.standardize=none"):
        query(_stats_query(), _context())
