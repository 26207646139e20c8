"""Simulated faults and attackers, as a ClientApp mod: the honest client code stays untouched.

``faults.*`` (``fedmer.config.FaultsConfig``) switches them on for robustness experiments. The
mod wraps every TRAIN message:

* **faults**: each round, ``failure_rate`` of the partitions (a seeded choice per round, so a
  run is reproducible) fail when sampled: they raise, reply after
  ``delay_s`` (later than a shorter ``federation.round_timeout_s``: a straggler), or drops out.
* **attackers**: a fixed, seeded set of ``attacker_fraction`` of the partitions. A model
  attacker trains honestly and then replaces its update Δ before it leaves: ``sign_flip``
  sends -s·Δ, ``scale`` s·Δ, ``noise`` a Gaussian direction, ``nan`` non-finite values. With
  ``within_bound`` the malicious update is rescaled to the clip bound C, so the server's norm
  check cannot tell it by size. ``label_flip`` poisons the data instead: the attacker trains
  on labels mapped y -> K-1-y (see :func:`poisoned_labels`), and its update passes every check.

Nothing here is used unless ``faults`` is active; the server never learns who attacked (the
comparison reads it from the config).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from typing import cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedmer import records as rk
from fedmer.config import ExperimentConfig, FaultsConfig

__all__ = ["SimulatedFault", "attackers", "fails_this_round", "fault_mod", "poisoned_labels"]

log = logging.getLogger(__name__)


class SimulatedFault(RuntimeError):  # noqa: N818 - reads as the event it reports
    """A fault injected on purpose (``faults.failure_rate``); counted by the server as a failure."""


def _uniform(*parts: object) -> float:
    """A reproducible number in [0, 1) from ``parts`` (no global RNG touched)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def attackers(faults: FaultsConfig, num_clients: int, seed: int) -> frozenset[int]:
    """The partitions that attack: ``round(attacker_fraction * num_clients)`` of them, seeded."""
    k = round(faults.attacker_fraction * num_clients)
    if faults.attack == "none" or k == 0:
        return frozenset()
    order = sorted(range(num_clients), key=lambda pid: _uniform("attacker", seed, pid))
    return frozenset(order[:k])


def fails_this_round(cfg: ExperimentConfig, pid: int, server_round: int) -> bool:
    """Whether partition ``pid`` suffers a simulated fault in ``server_round``.

    Exactly ``round(failure_rate * num_clients)`` partitions fail each round, a fresh seeded
    choice per round, so "30% fail" means 30% every round, not 30% on average.
    """
    n = cfg.federation.num_clients
    k = round(cfg.faults.failure_rate * n)
    if k == 0:
        return False
    order = sorted(range(n), key=lambda p: _uniform("fault", cfg.seed, server_round, p))
    return pid in order[:k]


def poisoned_labels(cfg: ExperimentConfig, pid: int, y: np.ndarray, num_classes: int) -> np.ndarray:
    """Labels a label-flipping attacker trains on (``K-1-y``); honest partitions get ``y`` back."""
    if cfg.faults.attack != "label_flip" or pid not in attackers(
        cfg.faults, cfg.federation.num_clients, cfg.seed
    ):
        return y
    return (num_classes - 1 - y).astype(y.dtype)


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    """L2 norm over every tensor, summed in float64."""
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors.values()))


def _malicious(arrays: ArrayRecord, global_arrays: ArrayRecord, faults: FaultsConfig, bound: float,
               rng: np.random.Generator) -> ArrayRecord:  # fmt: skip
    """The attacker's reply: the honest update replaced as ``faults.attack`` says."""
    sent = arrays.to_torch_state_dict()
    ref = global_arrays.to_torch_state_dict()
    keys = [k for k, v in sent.items() if torch.is_floating_point(v)]
    delta = {k: sent[k] - ref[k] for k in keys}
    norm = _norm(delta)
    s = faults.attack_scale
    if faults.attack == "nan":
        bad = {k: torch.full_like(v, float("nan")) for k, v in delta.items()}
    elif faults.attack == "sign_flip":
        bad = {k: -s * d for k, d in delta.items()}
    elif faults.attack == "scale":
        bad = {k: s * d for k, d in delta.items()}
    else:  # noise: a random direction with s times the honest norm
        bad = {k: torch.from_numpy(rng.standard_normal(tuple(d.shape))).to(d.dtype) for k, d in delta.items()}
        raw = _norm(bad)
        bad = {k: d * (s * norm / max(raw, 1e-12)) for k, d in bad.items()}
    if faults.within_bound and faults.attack != "nan":
        new_norm = _norm(bad)
        if new_norm > 0:
            bad = {k: d * (bound / new_norm) for k, d in bad.items()}
    out = dict(sent)
    out.update({k: ref[k] + bad[k] for k in keys})
    return ArrayRecord(out)


def fault_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: inject ``faults.*`` into TRAIN messages; a no-op when faults are off."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    from fedmer.federation.node import experiment_of, partition_of  # here: node.py imports this module

    cfg = experiment_of(context)
    if not cfg.faults.active:
        return call_next(msg, context)
    pid = partition_of(context, cfg)
    server_round = int(rk.scalar(cast(ConfigRecord, msg.content[rk.CONFIG]), rk.SERVER_ROUND))
    f = cfg.faults
    if fails_this_round(cfg, pid, server_round):
        if f.failure_mode == "timeout":
            log.warning("client %d: simulated straggler, replying after %.0f s", pid, f.delay_s)
            time.sleep(f.delay_s)
            return call_next(msg, context)
        what = "dropped out" if f.failure_mode == "dropout" else "crashed"
        raise SimulatedFault(f"client {pid} {what} in round {server_round} (simulated: faults.failure_rate)")
    reply = call_next(msg, context)
    if (
        f.attack in ("sign_flip", "scale", "noise", "nan")
        and pid in attackers(f, cfg.federation.num_clients, cfg.seed)
        and not reply.has_error()
    ):
        rng = np.random.default_rng([cfg.seed, server_round, pid])
        arrays = _malicious(
            cast(ArrayRecord, reply.content[rk.ARRAYS]),
            cast(ArrayRecord, msg.content[rk.ARRAYS]),
            f,
            cfg.privacy.update_clip_norm,
            rng,
        )
        content = RecordDict({rk.ARRAYS: arrays, rk.METRICS: reply.content[rk.METRICS]})
        return Message(content=content, reply_to=msg)
    return reply
