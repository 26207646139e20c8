"""The noise search, FedMER's (``fedmer.privacy.noise_search``) against Opacus' bisection, side by side.

Every search a run makes on a cold cache, timed both ways: each DP-SGD setting the auto recipe
tries for three client sizes (the default synthetic client, a RAVDESS audio-visual client, a
client of the deployment test), at epsilon 8 and 1, RDP, delta 1e-5. Before every search the
per-process epsilon caches are cleared, so each one evaluates the accountant from scratch as a
fresh Ray actor or ``flwr-clientapp`` process does. The two searches alternate, ``--repeats``
times; the table gives medians, the accountant evaluations each made (Opacus' counted by
wrapping ``RDPAccountant.get_epsilon`` during its search), and both answers' epsilon.

    .venv/bin/python -m bench.noise_search          # ~1 minute; bench/results/noise_search.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedmer.privacy import engine
from fedmer.privacy.engine import PrivacyHistory, compute_epsilon, planned_steps
from fedmer.privacy.noise_search import find_noise, first_guess
from fedmer.privacy.recipe import recipe_grid

RESULTS = Path(__file__).resolve().parent / "results" / "noise_search.json"
DELTA = 1e-5
#: (client, samples, configured batch, rounds): the default run's client 0 (640 sequences,
#: 20 rounds), a RAVDESS AV client (45 clips, 30 rounds), a deployment-test node (40, 2 rounds).
CLIENTS = (("default synthetic", 640, 128, 20), ("RAVDESS AV", 45, 32, 30), ("deployment test", 40, 16, 2))


def _cold() -> None:
    engine._epsilon.cache_clear()
    engine._step_rdp.cache_clear()


def _opacus(target: float, rate: float, steps: int) -> tuple[float, float, int]:
    calls = 0
    original = RDPAccountant.get_epsilon

    def counted(self: RDPAccountant, *args: Any, **kwargs: Any) -> float:
        nonlocal calls
        calls += 1
        return original(self, *args, **kwargs)

    RDPAccountant.get_epsilon = counted  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        sigma = get_noise_multiplier(
            target_epsilon=target, target_delta=DELTA, sample_rate=rate, steps=steps, epsilon_tolerance=0.01
        )
        return time.perf_counter() - t0, float(sigma), calls
    finally:
        RDPAccountant.get_epsilon = original  # type: ignore[method-assign]


def _fedmer(target: float, rate: float, steps: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    found = find_noise(
        lambda s: compute_epsilon(PrivacyHistory(((s, rate, steps),)), DELTA),
        target,
        start=first_guess(target, DELTA, rate, steps),
    )
    return time.perf_counter() - t0, found.sigma, found.evaluations


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    given = list(argv) if argv is not None else sys.argv[1:]
    args = parser.parse_args(given)
    warnings.filterwarnings("ignore")  # Opacus' alpha-range advice at extreme noise
    rows: list[dict[str, Any]] = []
    head = f"{'client':<18} {'eps':>3} {'rate':>6} {'steps':>5} {'opacus s':>8} {'evals':>5}"
    print(f"epsilon: RDP accountant, delta {DELTA:g}, one sample (DP-SGD's unit)")
    print(head + f" {'fedmer s':>8} {'evals':>5} {'speed-up':>8} {'eps opacus':>10} {'eps fedmer':>10}")
    for client, n, batch, rounds in CLIENTS:
        for target in (8.0, 1.0):
            for b, epochs in recipe_grid(n, batch):
                rate, steps = planned_steps(n, b, epochs, rounds)
                times: dict[str, list[float]] = {"opacus": [], "fedmer": []}
                for _ in range(args.repeats):
                    for name, search in (("opacus", _opacus), ("fedmer", _fedmer)):
                        _cold()
                        seconds, sigma, evals = search(target, rate, steps)
                        times[name].append(seconds)
                        if name == "opacus":
                            s_o, e_o = sigma, evals
                        else:
                            s_f, e_f = sigma, evals
                t_o, t_f = statistics.median(times["opacus"]), statistics.median(times["fedmer"])
                eps_o = compute_epsilon(PrivacyHistory(((s_o, rate, steps),)), DELTA)
                eps_f = compute_epsilon(PrivacyHistory(((s_f, rate, steps),)), DELTA)
                row = {
                    "client": client, "target": target, "rate": rate, "steps": steps,
                    "opacus_s": t_o, "opacus_evaluations": e_o, "opacus_sigma": s_o, "opacus_epsilon": eps_o,
                    "fedmer_s": t_f, "fedmer_evaluations": e_f, "fedmer_sigma": s_f, "fedmer_epsilon": eps_f,
                }  # fmt: skip
                rows.append(row)
                print(
                    f"{client:<18} {target:>3g} {rate:>6.3f} {steps:>5} {t_o:>8.3f} {e_o:>5} "
                    f"{t_f:>8.3f} {e_f:>5} {t_o / t_f:>7.1f}x {eps_o:>10.4f} {eps_f:>10.4f}"
                )
    total_o = sum(r["opacus_s"] for r in rows)
    total_f = sum(r["fedmer_s"] for r in rows)
    print(
        f"\nall {len(rows)} searches: Opacus {total_o:.2f} s, FedMER {total_f:.2f} s "
        f"({total_o / total_f:.1f}x); "
        f"evaluations {sum(r['opacus_evaluations'] for r in rows)} against "
        f"{sum(r['fedmer_evaluations'] for r in rows)}; medians of {args.repeats}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"opacus_s": total_o, "fedmer_s": total_f, "speed_up": total_o / total_f}
    payload = {"command": " ".join(["python -m bench.noise_search", *given]), "repeats": args.repeats}
    args.out.write_text(json.dumps({**payload, "total": summary, "searches": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
