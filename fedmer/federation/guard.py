"""Bad updates never reach the model: every reply is checked before aggregation, the aggregate after.

A client's reply is trusted for nothing the server can measure itself. Before aggregation a
reply must carry the model's arrays with exactly the keys and shapes the server sent, every
value finite, an update (reply minus the global model the server sent this round) whose L2
norm **measured by the server** is within the clip bound C every honest client clips to,
and a finite, positive aggregation weight. A reply that fails is rejected with its reason and
never averaged in. After aggregation, a non-finite aggregate is never applied: the round keeps
the previous global model (Flower's strategies keep it when ``aggregate_train`` returns no
arrays) and the run records why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, Message

from fedmer import records as rk

__all__ = ["NORM_SLACK", "as_arrays", "check_aggregate", "check_reply", "update_norm_of"]

#: Relative slack on the bound: a client's clip lands at C up to float32 round-off.
NORM_SLACK = 1e-4


def as_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """A record's arrays as numpy, by key (the server converts its global model once a round)."""
    return {k: np.asarray(v.numpy()) for k, v in record.items()}


def _non_finite(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Keys of floating-point arrays holding a NaN or an infinity."""
    return sorted(
        k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()
    )


def update_norm_of(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``arrays - reference`` over every floating-point entry (float64 sums)."""
    total = 0.0
    for key, ref in reference.items():
        if np.issubdtype(ref.dtype, np.floating):
            diff = arrays[key].astype(np.float64) - ref.astype(np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def check_reply(
    msg: Message,
    reference: Mapping[str, np.ndarray] | None,
    bound: float,
    weight_key: str = rk.NUM_EXAMPLES,
) -> str | None:
    """Why ``msg`` must not be aggregated, or None when it may be (see the module docstring).

    ``reference``: the global model sent this round (:func:`as_arrays`), None when unknown.
    """
    content = msg.content
    if rk.ARRAYS not in content.array_records:
        return "no model arrays in the reply"
    if rk.METRICS not in content.metric_records:
        return "no metrics in the reply"
    weight = content.metric_records[rk.METRICS].get(weight_key)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return f"aggregation weight {weight_key}={weight!r} is not a finite number > 0"
    arrays = as_arrays(content.array_records[rk.ARRAYS])
    bad = _non_finite(arrays)
    if bad:
        return f"non-finite values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
    if reference is None:
        return None
    ref = reference
    if set(arrays) != set(ref):
        missing, extra = sorted(set(ref) - set(arrays)), sorted(set(arrays) - set(ref))
        return f"model keys differ from the global model's: missing {missing[:3]}, unexpected {extra[:3]}"
    shapes = [k for k in ref if arrays[k].shape != ref[k].shape]
    if shapes:
        k = shapes[0]
        return f"shape of {k} is {arrays[k].shape}, the global model's is {ref[k].shape}"
    norm = update_norm_of(arrays, ref)
    if norm > bound * (1 + NORM_SLACK):
        return f"update norm {norm:.4g} (measured by the server) exceeds the clip bound C={bound:g}"
    return None


def check_aggregate(arrays: ArrayRecord | None) -> str | None:
    """Why the aggregate must not become the global model (non-finite entries), or None."""
    if arrays is None:
        return None
    bad = _non_finite(as_arrays(arrays))
    return f"non-finite aggregate in {', '.join(bad[:3])}" if bad else None
