"""DP-SGD accounting: cumulative, resumable, monotone, and calibrated to the target."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedmer.privacy.engine import (
    PrivacyHistory,
    compute_epsilon,
    gaussian_release_noise,
    make_private,
    noise_for_target,
    planned_steps,
)
from fedmer.training.loops import make_loader, train_epochs


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(
    noise=st.floats(0.5, 5.0),
    rate=st.floats(0.01, 0.5),
    steps=st.integers(1, 400),
    extra=st.integers(1, 400),
)
def test_epsilon_grows_with_steps_and_falls_with_noise(
    noise: float, rate: float, steps: int, extra: int
) -> None:
    delta = 1e-5
    base = compute_epsilon(PrivacyHistory(((noise, rate, steps),)), delta)
    more_steps = compute_epsilon(PrivacyHistory(((noise, rate, steps), (noise, rate, extra))), delta)
    more_noise = compute_epsilon(PrivacyHistory(((noise * 1.5, rate, steps),)), delta)
    assert 0 < base < more_steps
    assert more_noise < base


def test_history_round_trip_and_corruption() -> None:
    h = PrivacyHistory(((1.1, 0.2, 5),)).extended([(1.1, 0.2, 7)])
    assert h.steps == 12
    assert PrivacyHistory.from_lists(h.to_lists()) == h
    with pytest.raises(ValueError, match="corrupt privacy history"):
        PrivacyHistory.from_lists({"noise": [1.0], "rate": [0.1, 0.2], "steps": [1]})


def test_empty_history_spends_nothing_and_zero_noise_is_infinite() -> None:
    assert compute_epsilon(PrivacyHistory(), 1e-5) == 0.0
    assert math.isinf(compute_epsilon(PrivacyHistory(((0.0, 0.1, 10),)), 1e-5))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("target", [1.0, 8.0])
def test_noise_for_target_meets_the_whole_run_target(accountant: str, target: float) -> None:
    rate, steps = planned_steps(num_examples=160, batch_size=32, local_epochs=1, num_rounds=10)
    assert (rate, steps) == (0.2, 50)
    sigma = noise_for_target(target, 1e-5, rate, steps, accountant)
    eps = compute_epsilon(PrivacyHistory(((sigma, rate, steps),)), 1e-5, accountant)
    assert eps <= target
    assert eps > 0.8 * target  # not wastefully noisy


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_with_a_prior_release_meets_the_target_together(accountant: str) -> None:
    """The statistics release spends first; DP-SGD's noise is raised so both fit in the target."""
    target, delta = 4.0, 1e-5
    rate, steps = planned_steps(num_examples=160, batch_size=32, local_epochs=1, num_rounds=10)
    release = gaussian_release_noise(0.1 * target, delta, accountant)
    alone = compute_epsilon(PrivacyHistory(((release, 1.0, 1),)), delta, accountant)
    assert 0.099 * target <= alone <= 0.1 * target
    prior = ((release, 1.0, 1),)
    sigma = noise_for_target(target, delta, rate, steps, accountant, prior=prior)
    both = compute_epsilon(PrivacyHistory((*prior, (sigma, rate, steps))), delta, accountant)
    assert 0.99 * target <= both <= target
    assert sigma > noise_for_target(target, delta, rate, steps, accountant)
    assert gaussian_release_noise(math.inf, delta) == 0.0
    with pytest.raises(ValueError, match="already spend epsilon >= 0.1"):
        noise_for_target(0.1, delta, rate, steps, accountant, prior=prior)


def test_make_private_resumes_history_so_epsilon_accumulates() -> None:
    """Two rounds through real Opacus: the second round's epsilon counts the first round's steps."""
    import numpy as np

    from fedmer.data.base import MultimodalDataset

    rng = np.random.default_rng(0)
    n = 64
    data = MultimodalDataset(
        x=rng.normal(size=(n, 6, 3)).astype(np.float32),
        mask=np.ones((n, 1), bool),
        y=rng.integers(0, 2, n),
        person=np.arange(n),
        site=np.zeros(n, np.int64),
        modalities=("speech",),
        feature_slices=((0, 3),),
        class_names=("a", "b"),
    )

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(18, 2)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.lin(x.flatten(1))

    history = PrivacyHistory()
    epsilons = []
    for rnd in range(2):
        model = Tiny()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        setup = make_private(
            model, opt, make_loader(data, 16, rnd), noise_multiplier=1.0, max_grad_norm=1.0, history=history
        )
        train_epochs(setup.module, setup.loader, setup.optimizer, 1)
        history = setup.history()
        epsilons.append(compute_epsilon(history, 1e-5))
    assert history.steps == 8  # 4 steps per epoch (1 / sample rate), two rounds
    assert epsilons[1] > epsilons[0] > 0
    # Opacus' wrapper prefixes its keys; the user's module (what clients send) does not.
    assert all(k.startswith("_module.") for k in setup.module.state_dict())
    assert set(model.state_dict()) == {"lin.weight", "lin.bias"}
