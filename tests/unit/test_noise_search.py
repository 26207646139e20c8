"""The noise search: its epsilon is never above the target, within 0.1 % of it, in few evaluations."""

from __future__ import annotations

import math
import warnings

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from opacus.accountants.utils import get_noise_multiplier

from fedmer.privacy.engine import PrivacyHistory, compute_epsilon
from fedmer.privacy.noise_search import REL_TOL, SIGMA_MAX, find_noise, first_guess


def _in_band(eps: float, target: float, rel_tol: float = REL_TOL) -> bool:
    return target * (1 - rel_tol) < eps <= target


@settings(max_examples=300, deadline=None)
@given(
    scale=st.floats(1e-3, 1e3),
    power=st.floats(0.3, 4.0),
    offset=st.floats(0.0, 0.5),
    target=st.floats(0.6, 200.0),
    start=st.floats(1e-3, 1e4),
)
def test_any_falling_epsilon_lands_in_the_band(
    scale: float, power: float, offset: float, target: float, start: float
) -> None:
    """epsilon = scale / sigma^power + offset, its root within reach (offset < target, sigma* <= 1e5)."""
    assume(offset < target and (scale / (target - offset)) ** (1 / power) <= 1e5)
    calls: list[float] = []

    def epsilon(sigma: float) -> float:
        calls.append(sigma)
        return scale / sigma**power + offset

    found = find_noise(epsilon, target, start=start)
    assert _in_band(found.epsilon, target) or found.sigma <= 1.0001e-6  # needs next to no noise
    assert found.epsilon == epsilon(found.sigma)
    assert found.evaluations == len(calls) - 1 <= 40  # the last call is the check above


@pytest.mark.parametrize(
    ("rate", "steps", "target", "accountant"),
    [
        (0.25, 8, 8.0, "rdp"),  # a small client's auto-recipe candidate
        (0.2, 50, 1.0, "rdp"),
        (0.2, 400, 8.0, "rdp"),
        (1.0, 2, 8.0, "rdp"),  # full batch
        (0.01, 10_000, 3.0, "rdp"),
        (0.2, 50, 8.0, "prv"),
    ],
)
def test_opacus_epsilon_lands_in_the_band_in_fewer_evaluations_than_bisection(
    rate: float, steps: int, target: float, accountant: str
) -> None:
    """The accountant's own epsilon is searched; the answer agrees with Opacus' bisection to its tolerance."""

    def epsilon(sigma: float) -> float:
        return compute_epsilon(PrivacyHistory(((sigma, rate, steps),)), 1e-5, accountant)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = find_noise(epsilon, target, start=first_guess(target, 1e-5, rate, steps))
        opacus = get_noise_multiplier(
            target_epsilon=target, target_delta=1e-5, sample_rate=rate, steps=steps,
            accountant=accountant, epsilon_tolerance=0.01,
        )  # fmt: skip
        eps_opacus = epsilon(opacus)
    assert _in_band(found.epsilon, target)
    assert found.epsilon == epsilon(found.sigma)
    # Opacus' answer lies in (target - 0.01, target]; ours in the narrower band, so never noisier
    # than Opacus' by more than the noise that 0.01 of epsilon is worth
    assert target - 0.01 < eps_opacus <= target
    assert found.sigma <= opacus * (1 + 0.01 / target) + 1e-9
    assert found.evaluations <= 8  # Opacus' bisection takes 10-15


def test_an_unreachable_target_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"no noise multiplier up to 1e\+06 reaches epsilon 0.5"):
        find_noise(lambda s: 1.0 + 1.0 / s, 0.5)


@pytest.mark.parametrize("target", [0.0, -1.0, math.inf, math.nan])
def test_a_target_outside_zero_to_infinity_is_refused(target: float) -> None:
    with pytest.raises(ValueError, match="finite target > 0"):
        find_noise(lambda s: 1.0 / s, target)


def test_a_start_outside_the_searched_range_is_refused() -> None:
    with pytest.raises(ValueError, match="start must lie in"):
        find_noise(lambda s: 1.0 / s, 1.0, start=10 * SIGMA_MAX)


def test_an_epsilon_that_jumps_over_the_band_still_never_exceeds_the_target() -> None:
    """A step function has no sigma in the band: the answer is the least noise found within the target."""
    found = find_noise(lambda s: 10.0 if s < 2.0 else 4.0, 8.0)
    assert found.epsilon == 4.0 and 2.0 <= found.sigma < 2.0 * (1 + 1e-9)


def test_infinite_epsilon_at_small_noise_is_stepped_over() -> None:
    found = find_noise(lambda s: math.inf if s < 0.5 else 1.0 / s, 1.0, start=1e-3)
    assert _in_band(found.epsilon, 1.0)


def test_a_nan_epsilon_is_an_error_not_an_answer() -> None:
    with pytest.raises(ValueError, match="epsilon at noise .* is NaN"):
        find_noise(lambda s: math.nan if s < 3.0 else 1.0 / s, 1.0, start=0.5)
