"""Local training and evaluation loops, shared by clients, the server and benchmarks.

The loop is the same with or without DP: Opacus changes what the optimizer does with
gradients, not the loop. FedProx's proximal pull is applied as a separate step after
the DP update (``w -= lr * mu * (w - w_global)``): it depends only on the public
global model, so it costs no privacy, whereas adding it to the loss would be invisible
to Opacus' per-sample gradients and silently ignored.
"""

from __future__ import annotations

import logging
import math
import random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedmer.data.base import MultimodalDataset
from fedmer.metrics import classification_report

__all__ = ["TrainResult", "evaluate_model", "make_loader", "predict", "seed_everything", "train_epochs"]

log = logging.getLogger(__name__)

# Opacus' hooks fire on modules whose inputs need no grad (the first layer); harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass(frozen=True)
class TrainResult:
    """Mean loss over every example seen, and how many optimizer steps ran."""

    loss: float
    steps: int
    examples: int


def seed_everything(*parts: int) -> int:
    """Seed Python, NumPy and torch from a tuple such as (seed, round, client); return the seed."""
    seed = int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return seed


def make_loader(data: MultimodalDataset, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    """A DataLoader over ``(x, mask, y)`` with its own seeded generator (Opacus reuses it)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(data.to_tensors(), batch_size=batch_size, shuffle=shuffle, generator=generator)


def train_epochs(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    *,
    proximal_mu: float = 0.0,
    global_params: Mapping[str, torch.Tensor] | None = None,
    lr: float = 0.0,
) -> TrainResult:
    """Run ``epochs`` passes; raise FloatingPointError on a non-finite loss rather than send garbage."""
    criterion = nn.CrossEntropyLoss()
    model.train()
    total, seen, steps = 0.0, 0, 0
    named = dict(_unwrapped(model).named_parameters())
    for _ in range(epochs):
        for x, mask, y in loader:
            optimizer.zero_grad(set_to_none=True)
            logits = model(x, mask)
            # An empty Poisson batch still takes a (pure-noise) step: skipping it would
            # reveal that the batch was empty.
            loss = criterion(logits, y) if len(y) else logits.sum() * 0.0
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {float(loss.detach())} at step {steps}")
            loss.backward()
            optimizer.step()
            steps += 1
            if proximal_mu > 0 and global_params is not None:
                with torch.no_grad():
                    for name, p in named.items():
                        p.sub_(lr * proximal_mu * (p - global_params[name]))
            total += float(loss.detach()) * len(y)
            seen += len(y)
    return TrainResult(loss=total / seen if seen else math.nan, steps=steps, examples=seen)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The user's module inside an Opacus GradSampleModule (keys without ``_module.``)."""
    return getattr(model, "_module", model)


@torch.no_grad()
def predict(model: nn.Module, data: MultimodalDataset, batch_size: int = 512) -> tuple[np.ndarray, float]:
    """Predicted classes and mean cross-entropy over ``data``."""
    model.eval()
    tensors = data.to_tensors().tensors
    preds, loss_sum = [], 0.0
    for start in range(0, len(data), batch_size):
        x, mask, y = (t[start : start + batch_size] for t in tensors)
        logits = model(x, mask)
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        preds.append(logits.argmax(dim=1).numpy())
    y_pred = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    return y_pred, loss_sum / max(len(data), 1)


def evaluate_model(model: nn.Module, data: MultimodalDataset) -> dict:
    """Loss plus accuracy, macro-F1, UAR, per-class recall and confusion matrix."""
    y_pred, loss = predict(model, data)
    report = classification_report(data.y, y_pred, data.num_classes)
    report["loss"] = loss
    return report
