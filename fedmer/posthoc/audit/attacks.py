"""Membership-inference attacks on a trained FedMER model: loss threshold and LiRA.

* **Loss threshold** (Yeom et al., 2018): members were fitted, so their loss is lower;
  score = -cross-entropy under the target model. No shadow models, a lower bound on leakage.
* **LiRA** (Carlini et al., 2022): per-example calibration. ``K`` shadow models are trained
  with the target's own recipe on random halves of the candidate pool (the online
  variant), each on top of a background every shadow shares. For each candidate, the
  logit-scaled confidence ``phi = log(p_y / (1 - p_y))`` of the shadows that did / did not
  train on it is fitted by a Gaussian, and the target's ``phi`` is scored by the likelihood
  ratio (online) or by how far it sits above the "out" Gaussian (offline). With fewer than
  64 shadows one global variance per side is used, as the paper recommends.

Shadow halves are drawn per *person*, not per sequence: each candidate person is in exactly
``K // 2`` shadows with all of their pooled sequences. That matches the target's game (a
client trains on every sequence of its persons; non-members are persons never seen).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmer.config import ExperimentConfig
from fedmer.data.base import MultimodalDataset, concat_datasets
from fedmer.data.feature_stats import exact_feature_stats
from fedmer.models import build_model_for
from fedmer.posthoc.audit.roc import AttackResult
from fedmer.privacy.engine import planned_steps
from fedmer.privacy.run_noise import dp_sgd_noise, local_recipe
from fedmer.training.local import DPSGD, train_local
from fedmer.training.loops import seed_everything

__all__ = [
    "ShadowSet",
    "example_stats",
    "lira_attack",
    "loss_threshold_attack",
    "run_noise_multiplier",
    "run_steps",
    "train_like_run",
    "train_shadows",
]

log = logging.getLogger(__name__)
_GLOBAL_VARIANCE_BELOW = 64  # shadows; Carlini et al. fix the variance below this


@torch.no_grad()
def example_stats(
    model: nn.Module, data: MultimodalDataset, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example ``(cross-entropy loss, logit-scaled confidence phi)`` of the true class.

    ``phi = logit_y - logsumexp(other logits)`` equals ``log(p_y / (1 - p_y))`` without the
    cancellation that computing it from ``p_y`` near 1 would suffer.
    """
    model.eval()
    x_all, m_all, y_all = data.to_tensors().tensors
    losses, phis = [], []
    for start in range(0, len(data), batch_size):
        x, m, y = (t[start : start + batch_size] for t in (x_all, m_all, y_all))
        logits = model(x, m).double()
        true = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf"))
        losses.append((torch.logsumexp(logits, 1) - true).numpy())
        phis.append((true - torch.logsumexp(others, 1)).numpy())
    return np.concatenate(losses), np.concatenate(phis)


def loss_threshold_attack(
    model: nn.Module, members: MultimodalDataset, nonmembers: MultimodalDataset, *, seed: int = 0
) -> AttackResult:
    """Yeom et al.: score = -loss of each candidate under ``model``."""
    loss_in, _ = example_stats(model, members)
    loss_out, _ = example_stats(model, nonmembers)
    return AttackResult.from_scores("loss_threshold", -loss_in, -loss_out, seed=seed)


def run_noise_multiplier(cfg: ExperimentConfig, client_size: int) -> float:
    """The DP-SGD noise a client of ``client_size`` sequences used in this run (0 if non-private)."""
    if cfg.privacy.mode != "sample":
        return 0.0
    return float(dp_sgd_noise(cfg, client_size))  # the ClientApp's own derivation


def run_steps(cfg: ExperimentConfig, client_size: int) -> int:
    """Local DP-SGD steps a client of ``client_size`` took over the run (if in every round)."""
    return local_recipe(cfg, client_size).steps_per_round * cfg.federation.num_rounds


def train_like_run(
    cfg: ExperimentConfig, data: MultimodalDataset, seed: int, *, noise: float, steps: int
) -> nn.Module:
    """One model trained centrally with the run's client recipe (optimizer, lr, batch, DP).

    Trained for about ``steps`` optimizer steps (whole epochs over ``data``), so a bigger
    shadow dataset costs no more time and each example is seen as often as the mix implies.
    ``noise`` is the DP-SGD noise multiplier, used only when ``cfg.privacy.mode`` is "sample".
    """
    seed_everything(cfg.seed, seed)
    model = build_model_for(cfg, data)
    if model.standardizer is not None:  # as the run did, from its own training data (exact here)
        model.set_feature_stats(exact_feature_stats(data))
    p = cfg.privacy
    recipe = local_recipe(cfg, len(data))
    steps_per_epoch = planned_steps(len(data), recipe.batch_size, 1, 1)[1]
    dp = None
    if p.mode == "sample":
        dp = DPSGD(noise, p.max_grad_norm, p.accountant, grad_sample_mode=p.grad_sample_mode)
    epochs = max(1, round(steps / steps_per_epoch))
    train_local(model, data, epochs=epochs, lr=recipe.lr, batch_size=recipe.batch_size, seed=seed, dp=dp)
    return model


@dataclass(frozen=True)
class ShadowSet:
    """``phi[k, i]``: shadow k's confidence on pool example i; ``inside[k, i]``: k trained on i."""

    phi: np.ndarray
    inside: np.ndarray

    @property
    def count(self) -> int:
        return int(self.phi.shape[0])


def train_shadows(
    cfg: ExperimentConfig,
    pool: MultimodalDataset,
    *,
    shadows: int,
    noise: float,
    steps: int,
    background: MultimodalDataset | None = None,
    seed: int = 0,
) -> ShadowSet:
    """Train ``shadows`` models on ``background`` plus person-level random halves of ``pool``.

    ``background`` (data every shadow trains on, e.g. the other clients' data) makes the
    shadows see the population the target saw; without it they see only the candidates.
    """
    if shadows < 2:
        raise ValueError(f"LiRA needs at least 2 shadow models (one in, one out), got {shadows}")
    rng = np.random.default_rng([seed, 104729])
    persons = np.unique(pool.person)
    # Each person joins exactly shadows // 2 shadows, so every example has in and out fits.
    chosen = np.argsort(rng.random((len(persons), shadows)), axis=1) < shadows // 2  # (P, K)
    person_in = dict(zip(persons.tolist(), chosen, strict=True))
    inside = np.stack([person_in[p] for p in pool.person.tolist()], axis=1)  # (K, N)
    phi = np.empty(inside.shape, dtype=np.float64)
    for k in range(shadows):
        subset = pool.subset(np.flatnonzero(inside[k]))
        if background is not None:
            subset = concat_datasets([background, subset])
        model = train_like_run(cfg, subset, 7919 * (seed + 1) + k, noise=noise, steps=steps)
        _, phi[k] = example_stats(model, pool)
        log.info("shadow %d/%d trained on %d sequences", k + 1, shadows, len(subset))
    return ShadowSet(phi=phi, inside=inside)


def _gaussian_fit(phi: np.ndarray, mask: np.ndarray, global_variance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and sd of ``phi`` over the shadows selected by ``mask``."""
    count = mask.sum(axis=0)
    mean = np.where(mask, phi, 0.0).sum(axis=0) / np.maximum(count, 1)
    resid = np.where(mask, phi - mean, 0.0)
    if global_variance:
        sd = np.full(phi.shape[1], np.sqrt((resid**2).sum() / max(mask.sum() - 1, 1)))
    else:
        sd = np.sqrt((resid**2).sum(axis=0) / np.maximum(count - 1, 1))
    return mean, np.maximum(sd, 1e-6)


def _log_normal_pdf(x: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mean) / sd) ** 2 - np.log(sd)


def lira_attack(
    model: nn.Module,
    members: MultimodalDataset,
    nonmembers: MultimodalDataset,
    shadow: ShadowSet,
    *,
    offline: bool = False,
    seed: int = 0,
) -> AttackResult:
    """Score the target's confidence on ``members + nonmembers`` against the shadows' fits.

    ``shadow`` must have been trained on ``concat_datasets([members, nonmembers])`` (same order).
    """
    n_in = len(members)
    if shadow.phi.shape[1] != n_in + len(nonmembers):
        raise ValueError(
            f"shadow set scores {shadow.phi.shape[1]} examples, the candidates are "
            f"{n_in} + {len(nonmembers)}: train the shadows on concat_datasets([members, nonmembers])"
        )
    _, phi_target = example_stats(model, concat_datasets([members, nonmembers]))
    fixed = shadow.count < _GLOBAL_VARIANCE_BELOW
    mu_out, sd_out = _gaussian_fit(shadow.phi, ~shadow.inside, fixed)
    if offline:
        score = (phi_target - mu_out) / sd_out  # one-sided: how far above the "out" world
    else:
        mu_in, sd_in = _gaussian_fit(shadow.phi, shadow.inside, fixed)
        score = _log_normal_pdf(phi_target, mu_in, sd_in) - _log_normal_pdf(phi_target, mu_out, sd_out)
    name = "lira_offline" if offline else "lira_online"
    return AttackResult.from_scores(name, score[:n_in], score[n_in:], seed=seed)
