"""Differential privacy for FedMER clients: DP-SGD with persistent accounting, update clipping."""

from fedmer.privacy.clipping import clip_update, update_norm
from fedmer.privacy.engine import (
    DPSetup,
    PrivacyHistory,
    compute_epsilon,
    make_private,
    noise_for_target,
    planned_steps,
)

__all__ = [
    "DPSetup",
    "PrivacyHistory",
    "clip_update",
    "compute_epsilon",
    "make_private",
    "noise_for_target",
    "planned_steps",
    "update_norm",
]
