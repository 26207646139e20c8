"""Modality-aware FedAvg: a site without a sensor does not dilute that sensor's encoder.

Plain FedAvg averages every parameter over every replying client. A car without a cabin camera
never trains the face encoder, yet its reply carries that encoder (unchanged, or under DP-SGD
changed only by noise) and pulls the average back toward the old weights with the full weight
of its data. Here each modality's encoder (``encoders.<i>.*``) is averaged only over the clients
that hold modality ``i``, weighted by their number of samples with it; the shared parts (fusion,
head) are averaged as FedAvg does. A modality that no replying client holds keeps the global
weights of the round.

What this needs from a node, and so what leaves it: one extra metric per modality,
``modality-count-<i>``, the exact number of its samples with modality ``i`` (not noised; the
README's table lists it). Nodes send it only when the server's train config asks for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as fs

from fedmer import records as rk

__all__ = ["ModalityAwareFedAvg", "modality_weighted_average"]

_ENCODER = re.compile(r"^encoders\.(\d+)\.")


def modality_weighted_average(
    contents: list[RecordDict], weight_key: str, global_arrays: ArrayRecord | None
) -> ArrayRecord:
    """Average every array; an encoder's over the clients holding its modality (see the module)."""
    metrics = [cast(MetricRecord, c[rk.METRICS]) for c in contents]
    arrays = [cast(ArrayRecord, c[rk.ARRAYS]) for c in contents]
    base = [float(cast(float, m[weight_key])) for m in metrics]
    out: dict[str, Array] = {}
    for key in arrays[0]:
        match = _ENCODER.match(key)
        weights = base
        if match is not None:
            count = rk.modality_count_key(int(match.group(1)))
            weights = [float(cast(float, m[count])) if count in m else 0.0 for m in metrics]
        total = sum(weights)
        if total <= 0:  # no replying client holds this modality: keep the round's global weights
            if global_arrays is not None and key in global_arrays:
                out[key] = global_arrays[key]
                continue
            weights, total = base, sum(base)
        mean = sum(
            a[key].numpy().astype(np.float64) * (w / total) for a, w in zip(arrays, weights, strict=True)
        )
        out[key] = Array(np.asarray(mean, dtype=arrays[0][key].numpy().dtype))
    return ArrayRecord(out)


class ModalityAwareFedAvg(fs.FedAvg):
    """FedAvg with per-modality encoder averaging (``strategy=fedavg_modality``)."""

    _global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays
        config[rk.WANT_MODALITY_COUNTS] = True  # nodes add modality-count-<i> to their reply
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        arrays = modality_weighted_average(contents, self.weighted_by_key, self._global)
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)
