"""One node's training round, as the ClientApp tells it: charge the ledger, train, account.

:func:`train_round` is the DP training step of a round: from the server's ConfigRecord it
takes the learning rate, local epochs and FedProx's mu; under DP-SGD it derives the noise for
the planned run, charges the round's planned spend to the node's ledger *before* training
(a node at its cap refuses here), trains through the one local training function, and stores
the accountant history so epsilon accumulates over every round the node joins.
:func:`train_metrics` is the MetricRecord the node sends back.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, MetricRecord, MetricRecordValues
from torch import nn

from fedmer import records as rk
from fedmer.federation.node import Node, node_privacy
from fedmer.privacy.engine import PrivacyHistory, planned_steps
from fedmer.privacy.run_noise import local_recipe
from fedmer.training.local import DPSGD, train_local
from fedmer.training.loops import TrainResult, seed_everything

__all__ = ["NOISE_SEED_KEY", "RoundOutcome", "release_digest", "round_seed", "train_metrics", "train_round"]


@dataclass(frozen=True)
class RoundOutcome:
    """What one local round did and spent (epsilon of this run, and of the node's lifetime)."""

    train: TrainResult
    history: PrivacyHistory
    noise_multiplier: float
    epsilon: float
    epsilon_lifetime: float


#: node_config key: ``noise-seed="os"`` draws each round's seed (DP-SGD noise, batches) from the
#: OS's entropy instead of (run seed, round, partition).
NOISE_SEED_KEY = "noise-seed"


def round_seed(node: Node, config: ConfigRecord, node_config: Mapping[str, object] | None = None) -> int:
    """Seed Python, NumPy and torch for this node's round; return the seed.

    In simulation the seed is (run seed, round, partition), so a run is reproducible. A deployed
    node (``noise-seed="os"``, what ``fedmer deploy supernode`` sets) must not use it: the
    server chose the run seed, and noise it can regenerate protects nothing from it. Its seed
    comes from ``secrets`` (the OS's CSPRNG) each round; the noise itself is then drawn by
    torch's generator from that seed.
    """
    base = node.cfg.seed
    if node_config is not None and str(node_config.get(NOISE_SEED_KEY, "")) == "os":
        base = secrets.randbits(63)
    return seed_everything(base, int(rk.scalar(config, rk.SERVER_ROUND)), node.pid)


def release_digest(
    node: Node, config: ConfigRecord, global_state: Mapping[str, torch.Tensor], seed: int
) -> str:
    """SHA-256 of what a round's update is a function of: seed, round config, incoming model, data.

    Two trainings with the same digest compute the same update bit for bit (CPU, one thread),
    so a resumed run's replay of a charged round is that release again (see
    :meth:`fedmer.privacy.budget.NodePrivacy.charge`). The node's data is hashed too: the same
    noise on other data would be a new release.
    """
    h = hashlib.sha256(f"seed={seed}".encode())
    for key in sorted(config):
        if key != rk.LEDGER_RUN:  # which run is charged does not change the update
            h.update(f"{key}={config[key]!r};".encode())
    for name in sorted(global_state):
        t = global_state[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    data = node.data
    for arr in (data.x, data.mask, data.y, data.intensity):
        if arr is not None:
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def train_round(
    node: Node,
    context: Context,
    config: ConfigRecord,
    model: nn.Module,
    global_state: Mapping[str, torch.Tensor],
    seed: int,
) -> RoundOutcome:
    """Train ``model`` (holding ``global_state``) on the node's data for one round; see the module.

    ``seed`` is the round's seed (:func:`round_seed`), drawn before the model was built so that
    a run's noise and batches are the same whatever the model's size.
    """
    cfg, p = node.cfg, node.cfg.privacy
    server_round = int(rk.scalar(config, rk.SERVER_ROUND))
    recipe = local_recipe(cfg, len(node.data))
    lr, epochs, batch = recipe.lr, recipe.epochs, recipe.batch_size
    if p.recipe == "manual":  # the server's round config rules (as every Flower strategy sends it)
        lr = float(rk.scalar(config, rk.LR, cfg.federation.lr))
        epochs = int(rk.scalar(config, rk.LOCAL_EPOCHS, cfg.federation.local_epochs))
    dp, noise, lifetime = None, 0.0, math.inf
    privacy = node_privacy(context, cfg, node.pid)
    if rk.LEDGER_RUN in config:  # a resumed run charges, and accounts, the run it continues
        privacy.run_tag = str(config[rk.LEDGER_RUN])
    if p.sample_level:
        noise = recipe.noise_multiplier
        rate, steps = planned_steps(len(node.data), batch, epochs, 1)
        # an OS-drawn seed never repeats, so neither does the release: no digest, always charged
        own_seed = str(context.node_config.get(NOISE_SEED_KEY, "")) == "os"
        release = "" if own_seed else release_digest(node, config, global_state, seed)
        lifetime = privacy.charge((noise, rate, steps), server_round, release)  # raises BudgetExceeded
        dp = DPSGD(
            noise,
            p.max_grad_norm,
            p.accountant,
            history=privacy.history,
            planned_steps=steps,
            grad_sample_mode=p.grad_sample_mode,
        )
    result = train_local(
        model,
        node.data,
        epochs=epochs,
        lr=lr,
        batch_size=batch,
        seed=seed,
        dp=dp,
        proximal_mu=float(rk.scalar(config, rk.PROXIMAL_MU, 0.0)),
        global_params=global_state,
    )
    epsilon = math.inf
    if dp is not None:
        privacy.commit(result.history)
        epsilon = privacy.epsilon()
    return RoundOutcome(result.train, result.history, noise, epsilon, lifetime)


def train_metrics(
    node: Node, outcome: RoundOutcome, update_norm: float, clipped: bool, config: ConfigRecord | None = None
) -> MetricRecord:
    """The MetricRecord of a training reply: spend, and (monitoring) examples, loss and norm.

    Under ``privacy.reply_metrics`` minimal (auto with DP) only :data:`rk.TRAIN_REPLY_METRICS_MINIMAL`
    leaves: nothing that is an exact statistic of the node's data. Plus a sample count per
    modality when the server's strategy asks (``fedavg_modality``; refused with ``minimal``).
    """
    p = node.cfg.privacy
    counts: dict[str, int] = {}
    if config is not None and rk.WANT_MODALITY_COUNTS in config and p.reply_metrics != "minimal":
        counts = {rk.modality_count_key(i): int(c) for i, c in enumerate(node.data.mask.sum(axis=0))}
    metrics: dict[str, MetricRecordValues] = {
        **counts,
        rk.CLIENT_WEIGHT: 1,
        rk.EPSILON: outcome.epsilon,
        rk.EPSILON_LIFETIME: outcome.epsilon_lifetime,
        rk.DELTA: p.delta,
        rk.NOISE_MULTIPLIER: outcome.noise_multiplier,
        rk.STEPS: outcome.history.steps,
        rk.PARTITION_ID: node.pid,
    }
    if not p.minimal_replies:
        metrics |= {
            rk.NUM_EXAMPLES: len(node.data),
            rk.TRAIN_LOSS: outcome.train.loss,
            rk.UPDATE_NORM: update_norm,
            rk.UPDATE_CLIPPED: int(clipped),
        }
    return MetricRecord(metrics)
