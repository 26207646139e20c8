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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmer.data.base import MultimodalDataset
from fedmer.models.multimodal import MultimodalEmotionNet
from fedmer.privacy.bk_dpsgd import BookkeepingModule
from fedmer.training.metrics import classification_report

__all__ = [
    "SampleLosses",
    "TrainResult",
    "backpropagate",
    "batch_losses",
    "evaluate_model",
    "intensity_labels",
    "make_loader",
    "predict",
    "reduce_losses",
    "seed_everything",
    "train_epochs",
]

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


def intensity_labels(data: MultimodalDataset) -> torch.Tensor:
    """``(N,)`` int64 intensity labels, all -1 (unlabelled) for a dataset without them."""
    if data.intensity is None:
        return torch.full((len(data),), -1, dtype=torch.int64)
    return torch.from_numpy(np.asarray(data.intensity, dtype=np.int64))


def make_loader(data: MultimodalDataset, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    """A DataLoader over ``(x, mask, y, intensity)`` with its own seeded generator (Opacus reuses it).

    ``intensity`` is -1 where a sample (or the whole dataset) has no intensity label.
    """
    generator = torch.Generator().manual_seed(seed)
    dataset = TensorDataset(*data.to_tensors().tensors, intensity_labels(data))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


class SampleLosses(nn.Module):
    """A network's per-sample training losses as a module: ``forward(x, mask, y[, intensity]) -> (B,)``.

    What DP-SGD hands to Opacus. Its expanded-weights and functorch modes compute per-sample
    gradients only for what runs inside the wrapper's own ``forward`` (expanded weights swap the
    parameters in for that call alone), so the whole objective, not just the logits, must be one
    forward pass of the wrapped module. Its parameters are ``net``'s, shared, so training the
    wrapper trains ``net`` in place.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, mask: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        """``rest``: labels ``y`` and, optionally, intensity labels (-1 where unlabelled)."""
        return _net_losses(self.net, self.net, (x, mask, *rest))


def batch_losses(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample training losses ``(B,)`` of a ``(x, mask, y[, intensity])`` batch.

    A FedMER network supplies its own objective (:meth:`MultimodalEmotionNet.sample_losses`:
    category, intensity and auxiliary terms); any other module is trained on cross-entropy.
    A model that wraps :class:`SampleLosses` (DP-SGD's) computes them in its own forward, which
    every Opacus ``grad_sample_mode`` sees. An empty (Poisson) batch runs no forward pass: its
    per-sample gradients are set to empty tensors, which is what Opacus' hooks record for one and
    what its optimizer turns into a pure-noise step (expanded weights cannot run a batch of 0).
    Otherwise the inner method is called on the unwrapped module: Opacus' hooks sit on its
    layers, not on the wrapper, so per-sample gradients are captured all the same.
    """
    if isinstance(getattr(model, "_module", model), SampleLosses):
        if len(batch[0]) == 0:
            for p in model.parameters():
                if p.requires_grad:
                    p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]
            return torch.zeros(0, requires_grad=True)
        return model(*batch)
    return _net_losses(_unwrapped(model), model, batch)


def _net_losses(net: nn.Module, model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """``net``'s own objective if it is a FedMER network, else cross-entropy of ``model``'s logits."""
    x, mask, y, *rest = batch
    if isinstance(net, MultimodalEmotionNet):
        return net.sample_losses(x, mask, y, rest[0] if rest else None)
    return nn.functional.cross_entropy(model(x, mask), y, reduction="none")


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
    """Run ``epochs`` passes; raise FloatingPointError on a non-finite loss rather than send garbage.

    The loss of a batch reduces its per-sample losses (:func:`batch_losses`) as the model
    asks (:func:`reduce_losses`): their mean, or under DP-SGD their sum.
    """
    model.train()
    total, seen, steps = 0.0, 0, 0
    named = dict(_unwrapped(model).named_parameters())
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            losses = batch_losses(model, batch)
            # An empty Poisson batch still takes a (pure-noise) step: skipping it would
            # reveal that the batch was empty.
            loss = reduce_losses(model, losses)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {float(loss.detach())} at step {steps}")
            backpropagate(model, loss)
            optimizer.step()
            steps += 1
            if proximal_mu > 0 and global_params is not None:
                with torch.no_grad():
                    for name, p in named.items():
                        p.sub_(lr * proximal_mu * (p - global_params[name]))
            total += float(losses.detach().sum())
            seen += len(losses)
    return TrainResult(loss=total / seen if seen else math.nan, steps=steps, examples=seen)


def backpropagate(model: nn.Module, loss: torch.Tensor) -> None:
    """``loss.backward()``, or for book-keeping DP-SGD its own backward: the gradients wrt the
    recorded layer outputs only, from which its optimizer clips (:mod:`fedmer.privacy.bk_dpsgd`)."""
    if isinstance(model, BookkeepingModule):
        model.backward(loss)
    else:
        loss.backward()


def reduce_losses(model: nn.Module, losses: torch.Tensor) -> torch.Tensor:
    """The batch loss to backpropagate: the mean of ``losses``, or their sum for an Opacus wrapper
    built with ``loss_reduction="sum"`` (FedMER's DP-SGD: its optimizer averages, see
    :mod:`fedmer.privacy.dp_optimizer`). Either way the step averages over the batch; an empty
    batch gives a zero loss that still reaches every parameter."""
    if not len(losses):
        return losses.sum() * 0.0
    return losses.sum() if getattr(model, "loss_reduction", "mean") == "sum" else losses.mean()


def _unwrapped(model: nn.Module) -> nn.Module:
    """The user's network inside an Opacus wrapper and :class:`SampleLosses` (keys without prefixes)."""
    inner = getattr(model, "_module", model)
    return inner.net if isinstance(inner, SampleLosses) else inner


@torch.no_grad()
def _forward_all(
    model: nn.Module, data: MultimodalDataset, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Category logits ``(N, C)`` and, for a network with an intensity head, intensity logits."""
    model.eval()
    x_all, m_all, _ = data.to_tensors().tensors
    net = _unwrapped(model)
    logits, intensity = [], []
    for start in range(0, len(data), batch_size):
        x, mask = x_all[start : start + batch_size], m_all[start : start + batch_size]
        if isinstance(net, MultimodalEmotionNet):
            out = net.outputs(x, mask)
            logits.append(out.logits)
            if out.intensity_logits is not None:
                intensity.append(out.intensity_logits)
        else:
            logits.append(model(x, mask))
    c = data.num_classes
    all_logits = torch.cat(logits) if logits else torch.zeros(0, c)
    return all_logits, (torch.cat(intensity) if intensity else None)


def predict(model: nn.Module, data: MultimodalDataset, batch_size: int = 512) -> tuple[np.ndarray, float]:
    """Predicted classes and mean cross-entropy over ``data``."""
    logits, _ = _forward_all(model, data, batch_size)
    return logits.argmax(dim=1).numpy(), _mean_cross_entropy(logits, data.y)


def _mean_cross_entropy(logits: torch.Tensor, y: np.ndarray) -> float:
    """Mean cross-entropy of ``logits`` against labels ``y`` (0 for no sample)."""
    target = torch.from_numpy(np.asarray(y, dtype=np.int64))
    total = float(nn.functional.cross_entropy(logits, target, reduction="sum")) if len(target) else 0.0
    return total / max(len(target), 1)


def evaluate_model(model: nn.Module, data: MultimodalDataset, batch_size: int = 512) -> dict:
    """Loss plus accuracy, macro-F1, UAR, per-class recall and confusion matrix.

    For a network with an intensity head on data with intensity labels, also
    ``intensity_accuracy``, ``intensity_macro_f1``, ``intensity_uar`` and
    ``intensity_labelled`` (how many samples they are computed over: those labelled).
    """
    logits, intensity = _forward_all(model, data, batch_size)
    y_pred = logits.argmax(dim=1).numpy()
    report = classification_report(data.y, y_pred, data.num_classes)
    report["loss"] = _mean_cross_entropy(logits, data.y)
    if intensity is not None and data.intensity is not None:
        labelled = np.asarray(data.intensity) >= 0
        if labelled.any():
            k = len(data.intensity_names)
            i_pred = intensity.argmax(dim=1).numpy()[labelled]
            sub = classification_report(np.asarray(data.intensity)[labelled], i_pred, k)
            report.update({f"intensity_{key}": sub[key] for key in ("accuracy", "macro_f1", "uar")})
        report["intensity_labelled"] = int(labelled.sum())
    return report
