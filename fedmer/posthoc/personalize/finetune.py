"""Per-client personalization after federated training: fine-tune the fusion head only, with DP.

The global model serves the average client; a vehicle with an unusual sensor kit or a ward
with a skewed label mix may do better with its own head. Each client starts from the
final global model, freezes every encoder and trains only ``model.fusion`` on its own
training partition with Opacus DP-SGD. The privacy spend is planned before training
(Poisson sampling runs ``len(loader)`` steps per epoch), checked against the client's
ledger cap and written to *the same ledger the federated rounds used*, so the lifetime
epsilon the ledger reports covers the federated rounds and the fine-tune together.

Why that composition is valid, and when it is not: the ledger stores accountant entries
``(noise, sample rate, steps)`` and recomputes epsilon from all of them under one
accountant at one delta (RDP curves add, PRV distributions convolve). That is correct
only if the fine-tune is accounted with the same accountant and reported at the same delta;
a different delta would make the numbers incomparable (and :func:`fedmer.privacy.ledger.load_ledger`
refuses it). The fine-tune's own noise is derived from ``target_epsilon`` for its steps
alone, so its stand-alone epsilon is about the target while the ledger's increase is
smaller (composition of the curves is tighter than adding epsilons).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

from torch import nn

from fedmer.config import DEFAULT_GRAD_SAMPLE_MODE
from fedmer.data.base import MultimodalDataset
from fedmer.privacy.engine import PrivacyHistory, compute_epsilon, planned_steps
from fedmer.training.local import DPSGD, train_local
from fedmer.training.loops import TrainResult, seed_everything

__all__ = [
    "ClientResult",
    "DPPlan",
    "FineTuneResult",
    "PersonalizeError",
    "PersonalizeSettings",
    "finetune_head",
    "freeze_all_but_head",
    "head_parameters",
    "plan_steps",
]

log = logging.getLogger(__name__)


class PersonalizeError(ValueError):
    """Personalization cannot run as asked; the message says why and what would work."""


@dataclass(frozen=True)
class PersonalizeSettings:
    """How to fine-tune; None means "as in the run's config"."""

    epochs: int = 5
    lr: float | None = None
    batch_size: int | None = None
    target_epsilon: float = 1.0
    delta: float | None = None
    dp: bool = True
    cap: float | None = None  # replaces the ledgers' stored cap (the node's policy) when given
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise PersonalizeError(f"invalid epochs={self.epochs!r}: expected an integer >= 1")
        if self.lr is not None and not self.lr > 0:
            raise PersonalizeError(f"invalid lr={self.lr!r}: expected a number > 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise PersonalizeError(f"invalid batch_size={self.batch_size!r}: expected >= 1")
        if not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise PersonalizeError(
                f"invalid target_epsilon={self.target_epsilon!r}: expected a finite number > 0 "
                "(use --no-dp for a non-private fine-tune)"
            )
        if self.delta is not None and not 0 < self.delta < 1:
            raise PersonalizeError(f"invalid delta={self.delta!r}: expected 0 < delta < 1")
        if self.cap is not None and not self.cap >= 0:
            raise PersonalizeError(f"invalid cap={self.cap!r}: expected an epsilon >= 0")


@dataclass(frozen=True)
class ClientResult:
    """One client's outcome; privacy fields are None for --no-dp, personalized ones if refused."""

    client: int
    status: str  # personalized | refused
    reason: str | None
    n_train: int
    eval_set: str
    n_eval: int
    global_uar: float
    personalized_uar: float | None
    global_client_prior_accuracy: float
    personalized_client_prior_accuracy: float | None
    private: bool
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int | None
    epsilon_finetune: float | None  # stand-alone, at delta
    epsilon_before: float | None  # ledger lifetime epsilon before / after the fine-tune
    epsilon_after: float | None
    delta: float | None
    accountant: str | None
    unit: str | None

    @property
    def deployed_uar(self) -> float:
        """What the client ends up with: its personalized model, or the global one if refused."""
        return self.global_uar if self.personalized_uar is None else self.personalized_uar


@dataclass(frozen=True)
class DPPlan:
    """DP-SGD settings of one fine-tune; ``noise`` was derived for exactly ``steps`` at ``rate``."""

    noise: float
    rate: float
    steps: int
    max_grad_norm: float
    accountant: str
    delta: float
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE  # speed only: the same update and spend

    @property
    def entry(self) -> tuple[float, float, int]:
        """The ledger / accountant entry this fine-tune spends."""
        return (self.noise, self.rate, self.steps)

    def epsilon(self) -> float:
        """Stand-alone epsilon of this fine-tune at ``delta``."""
        return compute_epsilon(PrivacyHistory((self.entry,)), self.delta, self.accountant)


@dataclass(frozen=True)
class FineTuneResult:
    """The personalized model (plain module) and what training did."""

    model: nn.Module
    train: TrainResult
    trainable: int  # parameters that were allowed to change


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The fusion head's parameters, by their name in ``model`` (``fusion.*``)."""
    fusion = getattr(model, "fusion", None)
    if not isinstance(fusion, nn.Module):
        raise PersonalizeError(f"{type(model).__name__} has no .fusion head module to personalize")
    return {f"fusion.{k}": p for k, p in fusion.named_parameters()}


def freeze_all_but_head(model: nn.Module) -> list[nn.Parameter]:
    """Encoders (everything outside ``model.fusion``) frozen; return the head's parameters."""
    head = head_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.values():
        p.requires_grad_(True)
    return list(head.values())


def plan_steps(num_examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """Sample rate and DP-SGD steps of a fine-tune (Opacus' Poisson loader: ``len(loader)`` per epoch)."""
    return planned_steps(num_examples, batch_size, epochs, 1)


def finetune_head(
    global_model: nn.Module,
    data: MultimodalDataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    dp: DPPlan | None,
) -> FineTuneResult:
    """A copy of ``global_model`` whose head was trained on ``data`` (DP-SGD when ``dp`` is given)."""
    if len(data) == 0:
        raise PersonalizeError("cannot fine-tune on an empty training partition")
    model = copy.deepcopy(global_model).train()
    params = freeze_all_but_head(model)
    seed_everything(seed)
    sgd = None
    if dp is not None:
        sgd = DPSGD(
            dp.noise,
            dp.max_grad_norm,
            dp.accountant,
            planned_steps=dp.steps,
            grad_sample_mode=dp.grad_sample_mode,
        )
    local = train_local(
        model, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, dp=sgd, params=params
    )
    if dp is not None and local.history.entries != (dp.entry,):
        raise RuntimeError(f"Opacus accounted {local.history.entries}, the plan was {dp.entry}")
    result = local.train
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return FineTuneResult(model=model, train=result, trainable=sum(p.numel() for p in params))
