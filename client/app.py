"""FedMER ClientApp: one vehicle or hospital training with Opacus DP-SGD.

Per message: read the node's partition (cached per process), load the global
weights, train with DP-SGD resuming the node's accountant history from
``Context.state`` (so epsilon accumulates over every round the node joins; a round it
is not sampled in costs nothing), clip the model update to norm C, and reply with the
clipped weights and a MetricRecord of examples, loss, epsilon and delta.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmer import records as rk
from fedmer.config import ConfigError, ExperimentConfig
from fedmer.data.base import MultimodalDataset
from fedmer.data.registry import load_client_dataset
from fedmer.models import build_model_for
from fedmer.privacy.budget import open_budget
from fedmer.privacy.client_level import client_dp_mod
from fedmer.privacy.clipping import clip_update
from fedmer.privacy.engine import PrivacyHistory, compute_epsilon, make_private, planned_steps
from fedmer.privacy.run_noise import dp_sgd_noise
from fedmer.standardization import answer_stats_query, is_stats_query
from fedmer.train import evaluate_model, make_loader, seed_everything, train_epochs

__all__ = ["app", "experiment_of", "partition_of"]

log = logging.getLogger(__name__)
app = ClientApp(mods=[client_dp_mod])


@functools.lru_cache(maxsize=8)
def _experiment(items: tuple[tuple[str, object], ...]) -> ExperimentConfig:
    return ExperimentConfig.from_run_config(dict(items), complete=True)


def experiment_of(context: Context) -> ExperimentConfig:
    """The validated experiment config of this run (parsed once per process)."""
    return _experiment(tuple(sorted(context.run_config.items())))


def partition_of(context: Context, cfg: ExperimentConfig) -> int:
    """This node's partition id, checked against the federation size in the config."""
    node_config = context.node_config
    if "partition-id" not in node_config:
        raise ConfigError(
            "node_config has no 'partition-id': start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        )
    pid, n = (
        int(node_config["partition-id"]),
        int(node_config.get("num-partitions", cfg.federation.num_clients)),
    )
    if n != cfg.federation.num_clients:
        raise ConfigError(
            f"invalid num-partitions={n}: the run config has federation.num_clients="
            f"{cfg.federation.num_clients}; start {cfg.federation.num_clients} SuperNodes "
            "(simulation: --federation-config num-supernodes=N) or change federation.num_clients"
        )
    if not 0 <= pid < n:
        raise ConfigError(f"invalid partition-id={pid}: expected 0 <= partition_id < num-partitions={n}")
    return pid


def _model(cfg: ExperimentConfig, data: MultimodalDataset) -> torch.nn.Module:
    return build_model_for(cfg, data)


def _node(context: Context) -> tuple[ExperimentConfig, int, MultimodalDataset]:
    """Config, partition id and local data of this node (all cached per process)."""
    torch.set_num_threads(1)  # one Ray CPU per client: no oversubscription, reproducible sums
    cfg = experiment_of(context)
    pid = partition_of(context, cfg)
    return cfg, pid, load_client_dataset(cfg, pid)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """DP-SGD on the local partition; reply with the clipped update and cumulative epsilon."""
    cfg, pid, data = _node(context)
    config = msg.content[rk.CONFIG]
    server_round = int(config[rk.SERVER_ROUND])
    seed = seed_everything(cfg.seed, server_round, pid)

    model = _model(cfg, data)
    global_state = msg.content[rk.ARRAYS].to_torch_state_dict()
    model.load_state_dict(global_state)
    lr = float(config.get(rk.LR, cfg.federation.lr))
    epochs = int(config.get(rk.LOCAL_EPOCHS, cfg.federation.local_epochs))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loader = make_loader(data, cfg.federation.batch_size, seed)

    p = cfg.privacy
    history = (
        PrivacyHistory.from_lists(dict(context.state[rk.PRIVACY_STATE]))
        if rk.PRIVACY_STATE in context.state
        else PrivacyHistory()
    )
    noise, lifetime = 0.0, math.inf
    trained: torch.nn.Module = model
    if p.sample_level:
        noise = dp_sgd_noise(cfg, len(data))
        rate, steps = planned_steps(len(data), cfg.federation.batch_size, epochs, 1)
        # Checked and written to the node's ledger before training; raises BudgetExceeded.
        lifetime = open_budget(context, cfg, pid, (noise, rate, steps), server_round).epsilon_after
        setup = make_private(
            model,
            optimizer,
            loader,
            noise_multiplier=noise,
            max_grad_norm=p.max_grad_norm,
            history=history,
            accountant=p.accountant,
        )
        trained, optimizer, loader = setup.module, setup.optimizer, setup.loader
    result = train_epochs(
        trained,
        loader,
        optimizer,
        epochs,
        proximal_mu=float(config.get(rk.PROXIMAL_MU, 0.0)),
        global_params=global_state,
        lr=lr,
    )
    if p.sample_level:
        if result.steps != steps:
            raise RuntimeError(f"DP-SGD ran {result.steps} steps but the ledger recorded {steps}")
        history = setup.history()
        context.state[rk.PRIVACY_STATE] = ConfigRecord(history.to_lists())
        epsilon = compute_epsilon(history, p.delta, p.accountant)
    else:
        epsilon = math.inf

    clipped, norm, was_clipped = clip_update(model.state_dict(), global_state, p.update_clip_norm)
    metrics = MetricRecord(
        {
            rk.NUM_EXAMPLES: len(data),
            rk.CLIENT_WEIGHT: 1,
            rk.TRAIN_LOSS: result.loss,
            rk.EPSILON: epsilon,
            rk.EPSILON_LIFETIME: lifetime,
            rk.DELTA: p.delta,
            rk.NOISE_MULTIPLIER: noise,
            rk.STEPS: history.steps,
            rk.UPDATE_NORM: norm,
            rk.UPDATE_CLIPPED: int(was_clipped),
            rk.PARTITION_ID: pid,
        }
    )
    log.info(
        "client %d round %d: loss %.4f, epsilon %.3f (delta %g)",
        pid,
        server_round,
        result.loss,
        epsilon,
        p.delta,
    )
    content = RecordDict({rk.ARRAYS: ArrayRecord(clipped), rk.METRICS: metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss and accuracy of the global model on this node's own data."""
    cfg, pid, data = _node(context)
    model = _model(cfg, data)
    model.load_state_dict(msg.content[rk.ARRAYS].to_torch_state_dict())
    report = evaluate_model(model, data)
    metrics = MetricRecord(
        {
            rk.NUM_EXAMPLES: len(data),
            rk.CLIENT_WEIGHT: 1,
            rk.EVAL_LOSS: report["loss"],
            rk.EVAL_ACCURACY: report["accuracy"],
            rk.PARTITION_ID: pid,
        }
    )
    return Message(content=RecordDict({rk.METRICS: metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Feature sums when asked for them (data.standardize=federated), else this node's partition id.

    The partition id is what the server sorts nodes by, for reproducible sampling.
    """
    if is_stats_query(msg):
        cfg, pid, data = _node(context)
        return answer_stats_query(msg, context, cfg, pid, data)
    cfg = experiment_of(context)
    pid = partition_of(context, cfg)
    return Message(content=RecordDict({rk.METRICS: MetricRecord({rk.PARTITION_ID: pid})}), reply_to=msg)
