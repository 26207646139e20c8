"""Flower's client sampling on a random stream of its own, so a seed picks the same clients.

Flower's strategies sample with the module-level ``random``
(``flwr.serverapp.strategy.strategy_utils.sample_nodes``), and Ray draws from the same generator
in the same process: ``ray.init`` takes 56 ``getrandbits`` for its subscriber ids in the main
thread while the ServerApp thread is starting. As long as the server asked every node for its
partition before round 1, Ray was done by the first sample; once the simulation's mapping is read
without asking (``fedmer.federation.grid``), round 1's sample could land before or after Ray's
draws, and the same seed could pick different clients. :data:`SAMPLER` is a ``random.Random``
that only Flower's sampling uses while :func:`own_sampler` is active; the checkpoint carries its
state (``fedmer.federation.resume``), so a resumed run draws the sample the killed one would have.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

from flwr.serverapp.strategy import strategy_utils

__all__ = ["SAMPLER", "own_sampler"]

#: The generator behind Flower's ``sample_nodes`` while :func:`own_sampler` is active.
SAMPLER = random.Random(0)


@contextlib.contextmanager
def own_sampler(seed: int) -> Iterator[random.Random]:
    """Seed :data:`SAMPLER`; Flower's samplers draw from it, and nothing else does, until the block ends."""
    SAMPLER.seed(seed)
    previous = strategy_utils.random
    strategy_utils.random = SAMPLER  # type: ignore[assignment]  # sample_nodes calls random.sample
    try:
        yield SAMPLER
    finally:
        strategy_utils.random = previous
