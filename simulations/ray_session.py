"""One Ray session and one pool of ClientApp actors for every run of a process (sweeps, tests).

Flower 1.42's Ray backend starts Ray and a fresh actor pool for each simulation and shuts Ray
down at its end. A Hydra sweep or the frontier runs many simulations in one process, and each
paid that start-up again: ``ray.init`` (~5 s here) plus new actor processes that import torch
and Opacus and warm up (~7-10 s), 13-18 s of every 44-48 s frontier job.

:func:`keep_ray` swaps in :class:`ReusableRayBackend`: the first run starts Ray and the actors;
later runs with the same client resources take over the same idle, live actors, and Ray stays
up until the process exits (Ray's own exit hook stops it) or :func:`release_ray` is called.
A pool is reused only when the run that owned it left every actor idle and each one answers a
ping; anything else (a failed run, a dead actor, other resources) builds a new pool, so reuse
never hands a run a broken actor. An actor carries nothing of a run but process-level caches
keyed on the run's config (parsed configs, partitions); seeds are set afresh every round, so
metrics do not depend on reuse (``tests/e2e/test_ray_reuse.py``).

Flower has no hook for its backend: the runtime imports ``RayBackend`` from its module when a
simulation starts, and this replaces that module attribute (flwr is pinned below 1.43).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import ray
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.simulation.ray_transport.ray_actor import BasicActorPool

__all__ = ["REUSE_ENV", "ReusableRayBackend", "keep_ray", "release_ray", "reuse_count"]

log = logging.getLogger(__name__)

#: Environment variable that turns reuse off when set to 0.
REUSE_ENV = "FEDMER_REUSE_RAY"
#: Flower's own backend class (what the runtime uses when reuse is off).
_FLOWER_BACKEND = raybackend.RayBackend
#: Seconds an idle actor has to answer before the pool is rebuilt.
_PING_TIMEOUT_S = 10.0


class _Kept:
    """The pool that outlives its run, with the resources it was built for."""

    pool: BasicActorPool | None = None
    resources: dict[str, int | float] | None = None
    reused: int = 0


def _idle_and_alive(pool: BasicActorPool) -> bool:
    """Every actor back in the pool, none running a task, and each answers a ping."""
    if pool._future_to_actor or len(pool.pool) != pool.num_actors or pool.num_actors == 0:
        return False
    pings = [actor.__ray_ready__.remote() for actor in pool.pool]  # type: ignore[attr-defined]
    ready, _ = ray.wait(pings, num_returns=len(pings), timeout=_PING_TIMEOUT_S)
    return len(ready) == len(pings)


class ReusableRayBackend(_FLOWER_BACKEND):  # type: ignore[misc,valid-type]
    """Flower's Ray backend that hands its idle actors and Ray itself on to the next run."""

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        kept = _Kept.pool
        if kept is not None and _Kept.resources == self.client_resources and _idle_and_alive(kept):
            self.pool, self.app_fn = kept, app_fn
            _Kept.reused += 1
            log.info("reusing Ray and %d ClientApp actors from the previous run", kept.num_actors)
            return
        if kept is not None:
            log.info("not reusing the previous run's actors (busy, dead or other resources): new pool")
            kept.terminate_all_actors()
        _Kept.pool = None
        super().build(app_fn)
        _Kept.pool, _Kept.resources = self.pool, dict(self.client_resources)

    def terminate(self) -> None:
        """Leave Ray and the actors up for the next run; a pool left busy is not reused."""
        pool = self.pool
        if pool is not None and (pool._future_to_actor or len(pool.pool) != pool.num_actors):
            log.info("this run left actors busy; the next run builds a new pool")
            pool.terminate_all_actors()
            _Kept.pool = None


def keep_ray() -> None:
    """From now on, simulations in this process share one Ray session and its idle actors.

    ``FEDMER_REUSE_RAY=0`` in the environment turns this off (each run starts and stops its own
    Ray, as Flower does): for comparing, or if a run must not share processes with the last.
    """
    if os.environ.get(REUSE_ENV, "1") == "0":
        log.info("%s=0: each run starts its own Ray session", REUSE_ENV)
        return
    setattr(raybackend, "RayBackend", ReusableRayBackend)  # noqa: B010 - a module attribute Flower reads


def release_ray() -> None:
    """Stop the kept actors and Ray, and give simulations Flower's own backend back."""
    setattr(raybackend, "RayBackend", _FLOWER_BACKEND)  # noqa: B010
    if _Kept.pool is not None:
        _Kept.pool.terminate_all_actors()
    _Kept.pool, _Kept.resources = None, None
    if ray.is_initialized():
        ray.shutdown()


def reuse_count() -> int:
    """How many runs of this process took over a previous run's actors (for tests and logs)."""
    return _Kept.reused
