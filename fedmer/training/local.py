"""ONE way to fit a model on one node's data, with or without DP-SGD.

The ClientApp's round, the membership audit's shadow models and per-client personalisation
all train through :func:`train_local`, so Opacus is set up one way (Poisson sampling, the
accountant resumed from the node's history, the planned step count checked) and a fix to the
recipe reaches all three.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from fedmer.config import DEFAULT_GRAD_SAMPLE_MODE
from fedmer.data.base import MultimodalDataset
from fedmer.privacy.engine import PrivacyHistory, make_private
from fedmer.privacy.recipe import MOMENTUM  # the auto recipe's lr assumes this momentum
from fedmer.training.loops import SampleLosses, TrainResult, make_loader, train_epochs

__all__ = ["DPSGD", "LocalResult", "train_local"]


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD settings of one local training; ``planned_steps`` is what the ledger was charged.

    ``grad_sample_mode`` is how Opacus computes per-sample gradients (``privacy.grad_sample_mode``):
    a matter of speed only, the clipping, noise and accounting are the same whichever it is.
    """

    noise_multiplier: float
    max_grad_norm: float
    accountant: str = "rdp"
    history: PrivacyHistory = field(default_factory=PrivacyHistory)  # spend so far, resumed
    planned_steps: int | None = None
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE


@dataclass(frozen=True)
class LocalResult:
    """What training did, and the accountant history afterwards (unchanged without DP)."""

    train: TrainResult
    history: PrivacyHistory


def train_local(
    model: nn.Module,
    data: MultimodalDataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    dp: DPSGD | None = None,
    params: Iterable[nn.Parameter] | None = None,
    proximal_mu: float = 0.0,
    global_params: Mapping[str, torch.Tensor] | None = None,
) -> LocalResult:
    """Train ``model`` in place for ``epochs`` over ``data``; with ``dp``, as Opacus DP-SGD.

    ``params`` restricts what the optimiser updates (default: every parameter);
    ``proximal_mu`` and ``global_params`` add FedProx's pull toward the global model. With DP
    the step count must equal ``dp.planned_steps`` (what was charged before training), and the
    module is handed back without Opacus' hooks. Under DP, Opacus wraps the model's per-sample
    loss (:class:`SampleLosses`), so the whole objective runs inside its wrapper, as its
    expanded-weights mode needs.
    """
    optimizer: torch.optim.Optimizer = torch.optim.SGD(
        list(params) if params is not None else model.parameters(), lr=lr, momentum=MOMENTUM
    )
    loader = make_loader(data, batch_size, seed)
    history = dp.history if dp is not None else PrivacyHistory()
    trained: nn.Module = model
    setup = None
    if dp is not None:
        setup = make_private(
            SampleLosses(model),
            optimizer,
            loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            history=dp.history,
            accountant=dp.accountant,
            grad_sample_mode=dp.grad_sample_mode,
        )
        trained, optimizer, loader = setup.module, setup.optimizer, setup.loader
    result = train_epochs(
        trained, loader, optimizer, epochs, proximal_mu=proximal_mu, global_params=global_params, lr=lr
    )
    if setup is not None and dp is not None:
        if dp.planned_steps is not None and result.steps != dp.planned_steps:
            raise RuntimeError(
                f"DP-SGD ran {result.steps} steps but {dp.planned_steps} were planned and recorded"
            )
        history = setup.history()
        setup.module.remove_hooks()  # type: ignore[operator]
    return LocalResult(train=result, history=history)
