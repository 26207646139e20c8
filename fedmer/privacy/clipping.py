"""Clip a client's model update (its delta from the global model) to an L2 norm C.

Per-sample clipping in DP-SGD bounds what one recording contributes to a step; this
bounds what a whole client contributes to a round, which is what client-level DP and
robust aggregation assume, and what keeps a diverging client from wrecking the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["clip_update", "update_norm"]


def update_norm(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm of ``new - old`` over every floating-point tensor."""
    total = 0.0
    for key, value in new.items():
        if value.is_floating_point():
            total += float(torch.sum((value.double() - old[key].double()) ** 2))
    return math.sqrt(total)


def clip_update(
    new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor], clip_norm: float
) -> tuple[dict[str, torch.Tensor], float, bool]:
    """Return ``old + delta * min(1, C / ||delta||)``, the pre-clip norm, and whether it clipped.

    Non-float tensors (counters) are passed through from ``new``.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
    missing = set(new) ^ set(old)
    if missing:
        raise ValueError(f"state dicts differ in keys: {sorted(missing)}")
    norm = update_norm(new, old)
    if not math.isfinite(norm):
        raise FloatingPointError(f"model update has a non-finite norm ({norm}); refusing to send it")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped = _apply(new, old, scale)
    # Rounding to the weights' dtype can land a hair above C (the delta is small next to
    # the weights); shrink until what is actually sent is within the bound.
    for _ in range(20):
        sent = update_norm(clipped, old)
        if sent <= clip_norm:
            break
        scale *= (clip_norm / sent) * (1.0 - 1e-4)
        clipped = _apply(new, old, scale)
    else:  # pragma: no cover - would need a pathological dtype
        raise FloatingPointError(f"could not clip update of norm {norm} to {clip_norm}")
    return clipped, norm, scale < 1.0


def _apply(
    new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """``old + (new - old) * scale`` in float64, cast back; non-float tensors from ``new``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in new.items():
        if value.is_floating_point() and scale != 1.0:
            base = old[key].double()
            out[key] = (base + (value.double() - base) * scale).to(value.dtype)
        else:
            out[key] = value.clone()
    return out
