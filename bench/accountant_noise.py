"""How much less noise the PRV accountant needs than RDP for the same target, per run.

Opacus' RDP bound is valid but loose; the PRV accountant (Gopi et al. 2021) certifies the same
mechanism at a smaller epsilon, so the noise derived for a target epsilon is smaller. This
prints, for the default run and the RAVDESS client recipes, the DP-SGD noise multiplier each
accountant derives for the same (epsilon, delta) and their ratio, and the epsilon each
certifies for the RDP-derived noise (no training; a few seconds per row).

    .venv/bin/python -m bench.accountant_noise
"""

from __future__ import annotations

import warnings

from fedmer.privacy.engine import PrivacyHistory, compute_epsilon, noise_for_target, planned_steps

#: (name, client size, expected batch, local epochs, rounds): the default run's client and
#: RAVDESS clients (360 AV clips: 45 a client; 1,440 clips: 180), with today's and the auto recipe.
RUNS = (
    ("default synthetic (640 seq, batch 128, 2 epochs, 20 rounds)", 640, 128, 2, 20),
    ("RAVDESS 360 AV, manual (45 clips, batch 32, 2 epochs, 30 rounds)", 45, 32, 2, 30),
    ("RAVDESS 360 AV, auto (45 clips, full batch, 1 step, 30 rounds)", 45, 45, 1, 30),
)


def main() -> None:
    """Print one row per run and target epsilon."""
    warnings.filterwarnings("ignore")
    head = ("run", "eps", "sigma RDP", "sigma PRV", "PRV/RDP", "PRV eps of RDP sigma")
    print(f"{head[0]:<70} {head[1]:>4} {head[2]:>9} {head[3]:>9} {head[4]:>7} {head[5]:>20}")
    for name, n, batch, epochs, rounds in RUNS:
        rate, steps = planned_steps(n, batch, epochs, rounds)
        for eps in (8.0, 1.0):
            rdp = noise_for_target(eps, 1e-5, rate, steps, "rdp")
            prv = noise_for_target(eps, 1e-5, rate, steps, "prv")
            tighter = compute_epsilon(PrivacyHistory(((rdp, rate, steps),)), 1e-5, "prv")
            print(f"{name:<70} {eps:>4g} {rdp:>9.3f} {prv:>9.3f} {prv / rdp:>7.3f} {tighter:>20.2f}")


if __name__ == "__main__":
    main()
