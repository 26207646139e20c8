"""A DP-aware local recipe, chosen for each client from public quantities: ``privacy.recipe=auto``.

DP-SGD adds Gaussian noise of standard deviation ``sigma * C`` to the *sum* of a batch's
clipped per-sample gradients, so the noise on the averaged gradient of one step is
``sigma * C / B`` (Ponomareva et al. 2023, "How to DP-fy ML"). For a fixed budget, more steps
need a larger ``sigma``; a larger batch divides it by more samples. A recipe written for
non-private training (small batches, many epochs) therefore drowns a small client in noise:
45 RAVDESS clips at batch 32 for 120 steps take ``sigma * C / B`` to several times the signal.

The auto recipe searches a small grid, for each client size ``n``: sampling rates
``q = 1, 1/2, 1/4, ...`` (expected batch ``B = q n``, never below :data:`MIN_BATCH`; ``q = 1`` is
full-batch DP-GD) and local epochs ``1, 2`` (``epochs / q`` steps per round). For each it derives
the noise that meets the target over the whole run with the run's accountant, and keeps the
setting with the **most steps whose per-step noise** ``sigma * C / B`` **stays at or below**
:data:`NOISE_PER_STEP_MAX` ``x C``; when none does, the quietest one (full batch, one step per
round). The learning rate keeps the step length of ``federation.lr`` with SGD momentum 0.9 in
its steady state: a client that takes ``k`` steps a round (its optimiser is new each round)
only reaches the momentum's gain ``1 / (1 - 0.9)`` after many steps, so its lr is scaled by
that gain over the mean gain of its ``k`` steps (x10 for one step a round, about x1 for
hundreds), and by ``1 / C`` (the averaged clipped gradient scales with C). When even the
quietest setting leaves more noise per averaged gradient than :data:`NOISE_STEP_REF` ``x C``
(small clients at small epsilon), the lr also shrinks by ``NOISE_STEP_REF / noise``
(:func:`noise_lr_scale`), so that a step's noise does not undo what the earlier steps learnt.

What it looks at: the client's sample count (treated as public: README, "What leaves a node"),
the planned rounds, the target ``(epsilon, delta)`` and the accountant: no sample, label or
gradient. Its first two constants were chosen on the built-in synthetic data (public), the
third (:data:`NOISE_STEP_REF`) by validation across RAVDESS' training sites only (never its
held-out actors); none reads a sample at run time, so choosing spends no privacy.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

from fedmer.privacy.engine import HistoryEntry, noise_for_target, planned_steps

__all__ = [
    "MIN_BATCH",
    "NOISE_PER_STEP_MAX",
    "NOISE_STEP_REF",
    "LocalRecipe",
    "choose_recipe",
    "noise_lr_scale",
    "recipe_grid",
]

#: Smallest expected Poisson batch the auto recipe samples.
MIN_BATCH = 16
#: Largest per-step noise std on the averaged gradient, in units of the clip norm C.
NOISE_PER_STEP_MAX = 0.02
#: Noise per averaged gradient (units of C) above which the auto recipe shortens its step in
#: proportion, so one step's noise moves the weights by at most ``lr * NOISE_STEP_REF * C``.
#: Chosen by leave-one-training-site-out validation on RAVDESS' training actors (bench/dp_gap.py
#: --cv: lr 1 best at noise 0.055 C, lr 0.1 at 0.35 C); it never binds on the synthetic data,
#: whose recipes keep their noise within NOISE_PER_STEP_MAX.
NOISE_STEP_REF = 0.05
#: SGD momentum of every local optimiser (fedmer.training.local uses it; the lr rule assumes it).
MOMENTUM = 0.9


def momentum_lr_scale(steps_per_round: int, momentum: float = MOMENTUM) -> float:
    """Steady-state momentum gain over the mean gain of a fresh optimiser's first ``k`` steps."""
    k = max(1, steps_per_round)
    mean_gain = sum((1 - momentum**i) / (1 - momentum) for i in range(1, k + 1)) / k
    return (1 / (1 - momentum)) / mean_gain


def noise_lr_scale(noise_per_step: float, reference: float = NOISE_STEP_REF) -> float:
    """``min(1, reference / noise)``: the step shrinks with the noise once it exceeds ``reference``.

    Where one step's noise (std ``sigma * C / B`` on the averaged gradient) is larger than the
    signal can outweigh, a full step mostly moves the weights at random; a step that shrinks in
    proportion keeps the noise's displacement per step at ``lr * reference * C`` (the step rule
    of noisy gradient descent shrinks with the noise too: Bassily, Smith & Thakurta 2014).
    """
    if not noise_per_step > 0:
        return 1.0
    return min(1.0, reference / noise_per_step)


@dataclass(frozen=True)
class LocalRecipe:
    """One client's DP-SGD recipe for every round of the run, and why it was chosen."""

    batch_size: int  # expected Poisson batch (the client's size: full batch)
    epochs: int  # local epochs per round
    lr: float
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    noise_per_step: float  # sigma * C / B: std of the noise on one averaged gradient
    why: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def recipe_grid(n: int, configured_batch: int) -> list[tuple[int, int]]:
    """The ``(batch, epochs)`` pairs the auto recipe tries for ``n`` samples: full batch, halving
    down to MIN_BATCH (or the configured batch), each with 1 and 2 epochs. Public so that
    ``bench.noise_search`` times exactly the searches the recipe makes."""
    batches, b = [], n
    floor = max(1, min(MIN_BATCH, configured_batch, n))
    while b >= floor:
        batches.append(b)
        b //= 2
    return [(b, e) for b in batches for e in (1, 2)]


@functools.lru_cache(maxsize=4096)  # one entry per client size: a fleet has many
def choose_recipe(
    n: int,
    *,
    num_rounds: int,
    target_epsilon: float,
    delta: float,
    accountant: str,
    max_grad_norm: float,
    lr: float,
    batch_size: int,
    prior: tuple[HistoryEntry, ...] = (),
) -> LocalRecipe:
    """The auto recipe for a client of ``n`` samples (see the module docstring)."""
    if n < 1:
        raise ValueError(f"invalid client size n={n}: a client needs at least one sample")
    # (steps, batch, epochs, rate, sigma, noise per step), most steps first
    options: list[tuple[int, int, int, float, float, float]] = []
    by_steps = sorted(recipe_grid(n, batch_size), key=lambda c: -planned_steps(n, c[0], c[1], 1)[1])
    for batch, epochs in by_steps:
        rate, steps = planned_steps(n, batch, epochs, num_rounds)
        if options and options[-1][5] <= NOISE_PER_STEP_MAX and steps < options[-1][0]:
            break  # every setting left takes fewer steps than one that already fits
        sigma = (
            0.0  # epsilon = inf: clipping without noise, every setting fits
            if math.isinf(target_epsilon)
            else noise_for_target(target_epsilon, delta, rate, steps, accountant, prior=prior)
        )
        options.append((steps, batch, epochs, rate, sigma, sigma / (rate * n)))
    fits = [o for o in options if o[5] <= NOISE_PER_STEP_MAX]
    if fits:
        steps, batch, epochs, rate, sigma, noise = max(fits, key=lambda o: (o[0], -o[5]))
        why = (
            f"epsilon = inf, no noise: the most steps ({steps} over {num_rounds} rounds)"
            if math.isinf(target_epsilon)
            else f"the most steps ({steps} over {num_rounds} rounds) whose noise per averaged gradient "
            f"sigma*C/B = {noise:.4f} C stays within {NOISE_PER_STEP_MAX:g} C"
        )
    else:
        steps, batch, epochs, rate, sigma, noise = min(options, key=lambda o: (o[5], o[0]))
        why = (
            f"no setting keeps the noise per averaged gradient within {NOISE_PER_STEP_MAX:g} C for "
            f"{n} samples at epsilon {target_epsilon:g}: the quietest one, {noise:.4f} C "
            f"({'full batch' if rate == 1.0 else f'batch {rate * n:.0f}'}, {steps} steps)"
        )
    steps_per_round = steps // num_rounds
    return LocalRecipe(
        batch_size=batch,
        epochs=epochs,
        lr=lr * momentum_lr_scale(steps_per_round) * noise_lr_scale(noise) / max_grad_norm,
        sample_rate=rate,
        steps_per_round=steps_per_round,
        noise_multiplier=sigma,
        noise_per_step=noise * max_grad_norm,
        why=why,
    )
