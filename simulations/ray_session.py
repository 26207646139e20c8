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
from collections.abc import Callable
from typing import Any

import ray
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.simulation.ray_transport.ray_actor import BasicActorPool

from simulations.ray_start import REUSE_ENV, reuse_enabled, stop_ray, wait_for_ray

__all__ = ["REUSE_ENV", "ReusableRayBackend", "keep_ray", "prestart", "release_ray", "reuse_count"]

log = logging.getLogger(__name__)

#: Flower's own backend class (what the runtime uses when reuse is off).
_FLOWER_BACKEND = raybackend.RayBackend
#: Seconds an idle actor has to answer before the pool is rebuilt.
_PING_TIMEOUT_S = 10.0
#: Seconds a prestarted actor has to finish warming up (imports, config) before the pool is rebuilt.
_WARM_TIMEOUT_S = 300.0


class _Kept:
    """The pool that outlives its run, with the resources it was built for."""

    pool: BasicActorPool | None = None
    resources: dict[str, int | float] | None = None
    reused: int = 0
    prestarted: bool = False  # built by prestart(), no run has used it yet


def _idle_and_alive(pool: BasicActorPool, timeout: float) -> bool:
    """Every actor back in the pool, none running a task, and each answers a ping in time."""
    if pool._future_to_actor or len(pool.pool) != pool.num_actors or pool.num_actors == 0:
        return False
    pings = [actor.__ray_ready__.remote() for actor in pool.pool]  # type: ignore[attr-defined]
    try:
        ray.get(pings, timeout=timeout)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as err:
        log.warning("the kept ClientApp actors are not usable (%s): new pool", type(err).__name__)
        return False
    return True


class ReusableRayBackend(_FLOWER_BACKEND):  # type: ignore[misc,valid-type]
    """Flower's Ray backend that hands its idle actors and Ray itself on to the next run."""

    def __init__(self, backend_config: dict[str, Any]) -> None:
        wait_for_ray()  # Flower's init_ray would start a second Ray while an early start runs
        super().__init__(backend_config)

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        kept, prestarted = _Kept.pool, _Kept.prestarted
        _Kept.prestarted = False
        timeout = _WARM_TIMEOUT_S if prestarted else _PING_TIMEOUT_S
        if kept is not None and _Kept.resources == self.client_resources and _idle_and_alive(kept, timeout):
            self.pool, self.app_fn = kept, app_fn
            if prestarted:
                log.info("taking over %d ClientApp actors started before the run", kept.num_actors)
            else:
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


def keep_ray() -> bool:
    """From now on, simulations in this process share one Ray session and its idle actors.

    ``FEDMER_REUSE_RAY=0`` in the environment turns this off (each run starts and stops its own
    Ray, as Flower does): for comparing, or if a run must not share processes with the last.
    Returns whether reuse is on.
    """
    if not reuse_enabled():
        log.info("%s=0: each run starts its own Ray session", REUSE_ENV)
        return False
    setattr(raybackend, "RayBackend", ReusableRayBackend)  # noqa: B010 - a module attribute Flower reads
    return True


def prestart(backend_config: dict[str, Any], on_actor_init: Callable[[], None]) -> bool:
    """Create the ClientApp actors now, for this process's next run to take over.

    Each actor runs ``on_actor_init`` (imports, the run's config) while the driver goes on
    setting up the run; the run's backend takes the pool over once every actor has answered
    and the client resources are the same (else it builds its own). Ray is the one
    :func:`~simulations.ray_start.start_ray_early` started, or is started here as Flower's
    backend starts it. Returns False (nothing started) when reuse is off (``FEDMER_REUSE_RAY=0``).
    """
    if not keep_ray():
        return False
    backend = ReusableRayBackend(backend_config)
    backend.actor_kwargs = {**backend.actor_kwargs, "on_actor_init_fn": on_actor_init}
    backend.build(_no_app)
    _Kept.prestarted = True
    log.info("started %d ClientApp actors ahead of the run", backend.num_workers)
    return True


def _no_app() -> ClientApp:
    raise RuntimeError("a prestarted pool runs no ClientApp before a run takes it over")


def release_ray() -> None:
    """Stop the kept actors and Ray, and give simulations Flower's own backend back."""
    setattr(raybackend, "RayBackend", _FLOWER_BACKEND)  # noqa: B010
    wait_for_ray()
    if _Kept.pool is not None:
        _Kept.pool.terminate_all_actors()
    _Kept.pool, _Kept.resources, _Kept.prestarted = None, None, False
    stop_ray()


def reuse_count() -> int:
    """How many runs of this process took over a previous run's actors (for tests and logs)."""
    return _Kept.reused
