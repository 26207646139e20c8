"""The noise a run's config implies for each sample-level release, from the target epsilon.

Two releases spend a client's per-sample budget in one run: the feature-statistics release
of ``data.standardize=federated`` (once, before round 1) and DP-SGD (every round). Both the
ClientApp and the membership audit's shadow models need the same numbers, so they are
derived here, once, from the config: the release gets the smallest noise that spends
``privacy.stats_epsilon_fraction x target_epsilon`` on its own, and DP-SGD the smallest
noise that, composed with the release, stays within ``target_epsilon`` for the whole run.
"""

from __future__ import annotations

import functools
import math

from fedmer.config import ExperimentConfig
from fedmer.privacy.engine import HistoryEntry, gaussian_release_noise, noise_for_target, planned_steps
from fedmer.privacy.recipe import LocalRecipe, choose_recipe

__all__ = [
    "dp_sgd_noise",
    "local_recipe",
    "local_recipes",
    "release_skipped_because",
    "stats_noise_multiplier",
    "stats_prior",
]


def stats_noise_multiplier(cfg: ExperimentConfig) -> float:
    """Noise multiplier of the statistics release: 0 without DP-SGD or for target epsilon inf.

    ``inf`` when the release's share of the budget is below what the accountant can certify
    for one Gaussian release at any noise (RDP at delta 1e-5 with Opacus' default orders:
    about 0.103): then nothing is released and the inputs stay unstandardised (see
    :func:`release_skipped_because`).
    """
    p = cfg.privacy
    if cfg.data.standardize != "federated" or not p.sample_level or math.isinf(p.target_epsilon):
        return 0.0
    return _release_noise(p.stats_epsilon_fraction * p.target_epsilon, p.delta, p.accountant)


@functools.lru_cache(maxsize=32)
def _release_noise(epsilon: float, delta: float, accountant: str) -> float:
    try:
        return gaussian_release_noise(epsilon, delta, accountant)
    except ValueError:
        return math.inf


def release_skipped_because(cfg: ExperimentConfig) -> str | None:
    """Why no statistics are released in this run (None when they are)."""
    if not math.isinf(stats_noise_multiplier(cfg)):
        return None
    p = cfg.privacy
    return (
        f"privacy.stats_epsilon_fraction={p.stats_epsilon_fraction:g} of target_epsilon={p.target_epsilon:g} "
        f"is epsilon {p.stats_epsilon_fraction * p.target_epsilon:.3g}, below what the {p.accountant} "
        f"accountant can certify for one Gaussian release at delta {p.delta:g} with any noise; nothing "
        "is released and the inputs stay unstandardised (raise privacy.stats_epsilon_fraction to release)"
    )


def stats_prior(cfg: ExperimentConfig) -> tuple[HistoryEntry, ...]:
    """Accountant entries a node spends before DP-SGD in this run (the statistics release)."""
    sigma = stats_noise_multiplier(cfg)
    return ((sigma, 1.0, 1),) if 0 < sigma < math.inf else ()


def _auto(cfg: ExperimentConfig) -> bool:
    """The DP-aware recipe applies: asked for, DP-SGD on, noise derived from the target.

    A target of inf (the frontier's right end: clipping, no noise) goes through the same
    recipe with noise 0, so that point differs from epsilon = 8 by the noise alone.
    """
    p = cfg.privacy
    return p.recipe == "auto" and p.sample_level and p.noise_multiplier is None


def local_recipe(cfg: ExperimentConfig, num_examples: int) -> LocalRecipe:
    """A client's local batch, epochs, lr and DP-SGD noise for every round of this run.

    ``privacy.recipe=manual`` (or no DP-SGD, or a fixed noise multiplier): the configured
    ``federation`` values; ``auto``: :func:`fedmer.privacy.recipe.choose_recipe`.
    """
    p, f = cfg.privacy, cfg.federation
    if _auto(cfg):
        return choose_recipe(
            num_examples,
            num_rounds=f.num_rounds,
            target_epsilon=p.target_epsilon,
            delta=p.delta,
            accountant=p.accountant,
            max_grad_norm=p.max_grad_norm,
            lr=f.lr,
            batch_size=f.batch_size,
            prior=stats_prior(cfg),
        )
    rate, steps = planned_steps(num_examples, f.batch_size, f.local_epochs, f.num_rounds)
    sigma = dp_sgd_noise(cfg, num_examples) if p.sample_level else 0.0
    return LocalRecipe(
        batch_size=f.batch_size,
        epochs=f.local_epochs,
        lr=f.lr,
        sample_rate=rate,
        steps_per_round=steps // f.num_rounds,
        noise_multiplier=sigma,
        noise_per_step=sigma * p.max_grad_norm / (rate * num_examples),
        why="as configured (privacy.recipe=manual)" if p.recipe == "manual" else "no noise to balance",
    )


def local_recipes(cfg: ExperimentConfig, sizes: list[int]) -> dict[str, dict[str, object]]:
    """Every client's recipe by partition id, for the run's summary (what was chosen and why)."""
    if not cfg.privacy.sample_level:
        return {}
    return {str(pid): local_recipe(cfg, n).as_dict() for pid, n in enumerate(sizes)}


def dp_sgd_noise(cfg: ExperimentConfig, num_examples: int) -> float:
    """The configured DP-SGD noise, or the noise that with :func:`stats_prior` meets the target."""
    p, f = cfg.privacy, cfg.federation
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    if math.isinf(p.target_epsilon):
        return 0.0  # the frontier's right end: DP-SGD's clipping, no noise (epsilon = inf)
    if _auto(cfg):
        return local_recipe(cfg, num_examples).noise_multiplier
    rate, steps = planned_steps(num_examples, f.batch_size, f.local_epochs, f.num_rounds)
    # noise_for_target is cached per process: every round of the planned run asks for the same noise
    return noise_for_target(p.target_epsilon, p.delta, rate, steps, p.accountant, prior=stats_prior(cfg))
