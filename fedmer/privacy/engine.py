"""Opacus DP-SGD for one client, with an accountant whose history outlives the round.

Flower's Opacus example builds a fresh ``PrivacyEngine`` every round, so its epsilon
covers one round. Here the accountant's history, a list of
``(noise_multiplier, sample_rate, steps)``, is loaded before training and saved after,
so the epsilon a client reports is its cumulative spend over every round it joined.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from torch import nn
from torch.utils.data import DataLoader

from fedmer.config import GRAD_SAMPLE_MODES
from fedmer.privacy.bk_dpsgd import BOOKKEEPING_MODE, BookkeepingDPOptimizer, BookkeepingModule
from fedmer.privacy.dp_optimizer import LOSS_REDUCTION, SummedLossDPOptimizer
from fedmer.privacy.noise_cache import cached_on_disk
from fedmer.privacy.noise_search import REL_TOL, find_noise, first_guess

__all__ = [
    "DPSetup",
    "PrivacyHistory",
    "compute_epsilon",
    "gaussian_release_noise",
    "make_private",
    "noise_for_target",
    "planned_steps",
]

log = logging.getLogger(__name__)

#: One accountant entry: (noise multiplier, sampling rate, number of steps).
HistoryEntry = tuple[float, float, int]


@dataclass(frozen=True)
class PrivacyHistory:
    """A client's accountant history, in the form Opacus' accountants store it."""

    entries: tuple[HistoryEntry, ...] = ()

    @property
    def steps(self) -> int:
        return sum(int(e[2]) for e in self.entries)

    def to_lists(self) -> dict[str, list[float] | list[int]]:
        """Columns for a Flower ConfigRecord (lists of scalars only)."""
        return {
            "noise": [float(e[0]) for e in self.entries],
            "rate": [float(e[1]) for e in self.entries],
            "steps": [int(e[2]) for e in self.entries],
        }

    @classmethod
    def from_lists(cls, record: dict) -> PrivacyHistory:
        noise, rate, steps = (list(record.get(k, [])) for k in ("noise", "rate", "steps"))
        if not len(noise) == len(rate) == len(steps):
            raise ValueError(
                f"corrupt privacy history: column lengths {len(noise)}, {len(rate)}, {len(steps)}"
            )
        return cls(tuple((float(n), float(r), int(s)) for n, r, s in zip(noise, rate, steps, strict=False)))

    def extended(self, entries: Sequence[HistoryEntry]) -> PrivacyHistory:
        return PrivacyHistory(self.entries + tuple((float(n), float(r), int(s)) for n, r, s in entries))


def compute_epsilon(history: PrivacyHistory, delta: float, accountant: str = "rdp") -> float:
    """Cumulative epsilon of ``history`` at ``delta`` under the named Opacus accountant.

    Bit for bit what Opacus' accountant returns, but cached: a round asks for the same
    epsilon up to three times (cap check, ledger record, after training) and its RDP curve
    is a sum of a few repeated ``(noise, rate)`` entries (see :func:`_epsilon`).
    """
    if not history.entries:
        return 0.0
    if all(e[0] == 0.0 for e in history.entries):
        return math.inf
    return _epsilon(tuple(history.entries), float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon(entries: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    """Epsilon of ``entries``: a pure function of its arguments, so cached per process.

    RDP is computed incrementally: the per-step RDP curve of each ``(noise, rate)`` is
    computed once (:func:`_step_rdp`) and scaled by the entry's steps, exactly as
    ``RDPAccountant.get_privacy_spent`` does, so a history that grows by a few steps a
    round costs a multiply and a sum, not ~150 series evaluations per order. Other
    accountants (PRV) run Opacus as they are.
    """
    if accountant == "rdp":
        # Opacus: sum([compute_rdp(q, sigma, steps, orders) ...]), compute_rdp = curve * steps
        rdp = sum([_step_rdp(float(rate), float(noise)) * steps for noise, rate, steps in entries])
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(e) for e in entries]
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=4096)
def _step_rdp(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one sampled-Gaussian step at Opacus' default orders (read-only, shared by callers)."""
    curve = np.asarray(
        rdp_analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
        )
    )
    curve.setflags(write=False)
    return curve


def planned_steps(
    num_examples: int, batch_size: int, local_epochs: int, num_rounds: int
) -> tuple[float, int]:
    """Sample rate and total DP-SGD steps if the client joins every round.

    Matches Opacus' ``DPDataLoader``: sample rate ``1 / len(loader)`` and
    ``len(loader)`` steps per epoch.
    """
    steps_per_epoch = max(1, math.ceil(num_examples / batch_size))
    return 1.0 / steps_per_epoch, steps_per_epoch * local_epochs * num_rounds


def noise_for_target(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    prior: Sequence[HistoryEntry] = (),
) -> float:
    """The noise multiplier whose epsilon after ``steps`` lies in (0.999 x target, target].

    ``prior`` are releases the same run makes before DP-SGD (e.g. the feature-statistics
    release): the noise is then chosen so that prior plus DP-SGD meet the target together.
    A pure function of its arguments, cached per process and on disk
    (:mod:`fedmer.privacy.noise_cache`): every round, actor and job of a planned run asks for
    the same noise, and a search takes seconds of epsilon evaluations.
    """
    entries = tuple((float(n), float(r), int(s)) for n, r, s in prior)
    # floats as floats, so that 8 and 8.0 are one entry on disk as they are in memory
    return _noise_for_target(
        float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant, entries
    )


#: How :func:`_search` finds the noise; part of the disk cache's key, so that changing the
#: search (its tolerance, its method) never reads an answer the old one stored.
_SEARCH = f"fedmer find_noise: Illinois on log epsilon, epsilon in (target*(1-{REL_TOL:g}), target]"


def _search(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prior: tuple[HistoryEntry, ...],
) -> float:
    base = PrivacyHistory().extended(prior)
    with _quiet_alpha_range():
        spent_before = compute_epsilon(base, delta, accountant) if prior else 0.0
    if spent_before >= target_epsilon:
        raise ValueError(
            f"the releases before training already spend epsilon >= {target_epsilon:g} "
            f"(delta {delta:g}): no DP-SGD noise can meet the target"
        )

    def epsilon(sigma: float) -> float:
        return compute_epsilon(base.extended([(sigma, sample_rate, steps)]), delta, accountant)

    return _find(epsilon, target_epsilon, first_guess(target_epsilon, delta, sample_rate, steps))


def _find(epsilon: Callable[[float], float], target: float, start: float) -> float:
    with _quiet_alpha_range():
        found = find_noise(epsilon, target, start=start)
    log.debug(
        "noise %.6g: epsilon %.6g (target %g), %d evaluations",
        found.sigma, found.epsilon, target, found.evaluations,
    )  # fmt: skip
    return found.sigma


@contextlib.contextmanager
def _quiet_alpha_range() -> Iterator[None]:
    """Searches probe noise levels where Opacus warns that its best order is at the alpha range's end."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        yield


#: The search, cached per process (every round asks again) and on disk (every actor, job and
#: node process asks again): :mod:`fedmer.privacy.noise_cache`.
_noise_for_target = functools.lru_cache(maxsize=4096)(cached_on_disk(_SEARCH)(_search))


def gaussian_release_noise(target_epsilon: float, delta: float, accountant: str = "rdp") -> float:
    """Smallest noise multiplier of one Gaussian release (sampling rate 1) within ``target_epsilon``."""
    if math.isinf(target_epsilon):
        return 0.0
    return _find(
        lambda s: compute_epsilon(PrivacyHistory(((s, 1.0, 1),)), delta, accountant),
        target_epsilon,
        first_guess(target_epsilon, delta, 1.0, 1),
    )


@dataclass
class DPSetup:
    """What ``make_private`` hands back: wrapped objects plus the engine to read spend from."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    engine: PrivacyEngine
    noise_multiplier: float

    def history(self) -> PrivacyHistory:
        return PrivacyHistory(
            tuple((float(n), float(r), int(s)) for n, r, s in self.engine.accountant.history)
        )


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    history: PrivacyHistory,
    accountant: str = "rdp",
    grad_sample_mode: str = "hooks",
) -> DPSetup:
    """Wrap model, optimizer and loader for DP-SGD with Poisson sampling, resuming ``history``.

    ``grad_sample_mode`` picks how each sample's clipped gradient is computed (one of
    ``GRAD_SAMPLE_MODES``): "bk", FedMER's book-keeping (:mod:`fedmer.privacy.bk_dpsgd`,
    whose wrapper must be trained with :func:`fedmer.training.loops.backpropagate`), or one of
    Opacus' per-sample-gradient modes. Book-keeping, expanded weights ("ew") and functorch see
    only what runs inside the wrapped module's forward, so the loss must be computed through
    it (``train_local`` wraps ``SampleLosses``, and passes the configured mode). The default is
    hooks, which also serves a caller that wraps a bare network and computes its loss outside
    the wrapper.

    The wrapper is built for a loss *summed* over the batch (its ``loss_reduction``, which
    :func:`fedmer.training.loops.reduce_losses` follows) and the optimizer averages once
    (:class:`~fedmer.privacy.dp_optimizer.SummedLossDPOptimizer`): Opacus' ``mean`` step,
    without scaling every per-sample gradient by the batch size and back.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        valid = ", ".join(GRAD_SAMPLE_MODES)
        raise ValueError(f"invalid grad_sample_mode={grad_sample_mode!r}: expected one of {valid}")
    bookkeeping = grad_sample_mode == BOOKKEEPING_MODE
    engine = PrivacyEngine(accountant=accountant)
    engine.accountant.history = [tuple(e) for e in history.entries]
    module, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode="no_op" if bookkeeping else grad_sample_mode,  # book-keeping: no Opacus hooks
        loss_reduction=LOSS_REDUCTION,
    )
    if bookkeeping:
        module = BookkeepingModule(model)
        private: SummedLossDPOptimizer = BookkeepingDPOptimizer.for_module(dp_optimizer, module)
    else:
        private = SummedLossDPOptimizer.replacing(dp_optimizer)
    return DPSetup(module, private, dp_loader, engine, noise_multiplier)
