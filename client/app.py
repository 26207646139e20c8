"""FedMER ClientApp: one vehicle or hospital training with Opacus DP-SGD.

Per message: read the node's partition (cached per process), load the global weights,
train one round with DP-SGD resuming the node's accountant history from ``Context.state``
(so epsilon accumulates over every round the node joins; a round it is not sampled in costs
nothing, and the spend is charged to the node's ledger before training), clip the model
update to norm C, and reply with the clipped weights and a MetricRecord of examples, loss,
epsilon and delta.
"""

from __future__ import annotations

import logging
from typing import cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmer import records as rk
from fedmer.federation.client_round import round_seed, train_metrics, train_round
from fedmer.federation.faults import fault_mod
from fedmer.federation.node import experiment_of, node_of, partition_of
from fedmer.federation.statistics import answer_stats_query, is_stats_query
from fedmer.models import build_model_for
from fedmer.privacy.client_level import client_dp_mod
from fedmer.privacy.clipping import clip_update
from fedmer.training.loops import evaluate_model

__all__ = ["app"]

log = logging.getLogger(__name__)
# fault_mod is outermost: a simulated attacker tampers with the reply after honest clipping
app = ClientApp(mods=[fault_mod, client_dp_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """DP-SGD on the local partition; reply with the clipped update and cumulative epsilon."""
    node = node_of(context)
    config = cast(ConfigRecord, msg.content[rk.CONFIG])
    seed = round_seed(node, config, context.node_config)
    global_state = cast(ArrayRecord, msg.content[rk.ARRAYS]).to_torch_state_dict()
    model = build_model_for(node.cfg, node.data)
    model.load_state_dict(global_state)

    outcome = train_round(node, context, config, model, global_state, seed)
    bound = node.cfg.privacy.update_clip_norm
    clipped, norm, was_clipped = clip_update(model.state_dict(), global_state, bound)

    log.info(
        "client %d: loss %.4f, epsilon %.3f (delta %g)",
        node.pid,
        outcome.train.loss,
        outcome.epsilon,
        node.cfg.privacy.delta,
    )
    metrics = train_metrics(node, outcome, norm, was_clipped, config)
    return Message(content=RecordDict({rk.ARRAYS: ArrayRecord(clipped), rk.METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss and accuracy of the global model on this node's own data."""
    node = node_of(context)
    model = build_model_for(node.cfg, node.data)
    model.load_state_dict(cast(ArrayRecord, msg.content[rk.ARRAYS]).to_torch_state_dict())
    report = evaluate_model(model, node.data)
    metrics = MetricRecord(
        {
            rk.NUM_EXAMPLES: len(node.data),
            rk.CLIENT_WEIGHT: 1,
            rk.EVAL_LOSS: report["loss"],
            rk.EVAL_ACCURACY: report["accuracy"],
            rk.PARTITION_ID: node.pid,
        }
    )
    return Message(content=RecordDict({rk.METRICS: metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Feature sums when asked for them (data.standardize=federated), else this node's partition id.

    The partition id is what the server sorts nodes by, for reproducible sampling.
    """
    if is_stats_query(msg):
        node = node_of(context)
        return answer_stats_query(msg, context, node.cfg, node.pid, node.data)
    pid = partition_of(context, experiment_of(context))
    return Message(content=RecordDict({rk.METRICS: MetricRecord({rk.PARTITION_ID: pid})}), reply_to=msg)
