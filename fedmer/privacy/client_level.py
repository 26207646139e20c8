"""Client-level DP: Flower's own wrappers around whichever strategy the config chose.

The unit protected is one whole client (a vehicle or a hospital with all its data).
We only choose and configure Flower's ``DifferentialPrivacy{Server,Client}Side
{Fixed,Adaptive}Clipping``; with fixed clipping Flower's RDP accountant tracks the
client-level epsilon. That accountant's conditions are met by construction and checked
in ``fedmer.config``: no sampling amplification is claimed (Flower samples a fixed
number of clients without replacement, so the epsilon is as if every client joined
every round), the inner aggregation is FedAvg's (fedavg or fedprox), every client
reports the same weight (``client-weight`` = 1), and exactly ``clients_per_round``
replies are expected (a failed client stops the accounted round, loudly).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp import strategy as fs
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, SamplingMethod
from flwr.supercore.privacy_accounting import PrivacyConfig as FlowerPrivacyConfig
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedmer import records as rk
from fedmer.config import ConfigError, ExperimentConfig
from fedmer.privacy.noise_search import find_noise

__all__ = ["client_dp_mod", "client_level_epsilon", "client_noise_multiplier", "wrap_client_level_dp"]

log = logging.getLogger(__name__)


def wrap_client_level_dp(inner: fs.Strategy, cfg: ExperimentConfig) -> fs.Strategy:
    """``inner`` wrapped in the Flower DP strategy the config names (accounted when fixed)."""
    p, n = cfg.privacy, cfg.federation.clients_per_round
    server_side = p.client_clipping_side == "server"
    if p.client_clipping == "adaptive":
        cls = (
            fs.DifferentialPrivacyServerSideAdaptiveClipping
            if server_side
            else fs.DifferentialPrivacyClientSideAdaptiveClipping
        )
        log.warning(
            "client-level DP with adaptive clipping: Flower has no accountant for it, "
            "so no client-level epsilon is reported"
        )
        try:
            return cls(inner, client_noise_multiplier(cfg), n, initial_clipping_norm=p.update_clip_norm)
        except ValueError as err:  # Flower checks the noise it can split off for the clipped count
            raise ConfigError(
                f"invalid privacy.client_noise_multiplier={p.client_noise_multiplier!r} for adaptive "
                f"clipping with {n} clients per round: {err} (more clients per round or less noise)"
            ) from err
    fixed_cls = (
        fs.DifferentialPrivacyServerSideFixedClipping
        if server_side
        else fs.DifferentialPrivacyClientSideFixedClipping
    )
    noise = client_noise_multiplier(cfg)
    if noise == 0.0:  # target epsilon = inf: clipping only; Flower accounts only noisy releases
        log.warning("client-level DP with noise 0 (target epsilon inf): updates are clipped, not private")
        return fixed_cls(inner, 0.0, p.update_clip_norm, n, accountant=None)
    return fixed_cls(inner, noise, p.update_clip_norm, n, accountant=_accountant(cfg))


def _accountant(cfg: ExperimentConfig) -> RdpAccountant:
    """Flower's RDP accountant, under the conditions its fixed-clipping wrappers require."""
    return RdpAccountant(
        FlowerPrivacyConfig(
            target_delta=cfg.privacy.delta,
            population_size=cfg.federation.num_clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )


def client_noise_multiplier(cfg: ExperimentConfig) -> float:
    """The configured client-level noise, or the smallest that keeps ``num_rounds`` releases
    within ``privacy.target_epsilon`` by Flower's own accountant (so the epsilon it reports
    at the end is at most the target); 0 for an infinite target."""
    p = cfg.privacy
    if p.client_noise_multiplier is not None:
        return float(p.client_noise_multiplier)
    if math.isinf(p.target_epsilon):
        return 0.0
    return _noise_for_client_target(
        p.target_epsilon,
        p.delta,
        cfg.federation.num_rounds,
        cfg.federation.num_clients,
        cfg.federation.clients_per_round,
    )


@functools.lru_cache(maxsize=64)
def _noise_for_client_target(
    target: float, delta: float, rounds: int, population: int, sampled: int
) -> float:
    def epsilon(sigma: float) -> float:
        acc = RdpAccountant(
            FlowerPrivacyConfig(
                target_delta=delta,
                population_size=population,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
        acc.compose(GaussianPrivacyEvent(sigma, sampled, population), count=rounds)
        return acc.get_epsilon(delta)

    try:
        found = find_noise(epsilon, target, rel_tol=1e-4)
    except ValueError as err:
        message = f"invalid privacy.target_epsilon={target!r}: no noise up to 1e6 reaches it"
        raise ConfigError(message) from err
    log.info(
        "client-level noise %.4f meets epsilon %.3g at delta %.1e over %d rounds (%d evaluations)",
        found.sigma, target, delta, rounds, found.evaluations,
    )  # fmt: skip
    return found.sigma


def client_level_epsilon(strategy: fs.Strategy) -> float | None:
    """Cumulative client-level epsilon (at the accountant's delta), or None when not accounted."""
    spent = getattr(strategy, "privacy_spent", None)
    result = spent() if callable(spent) else None
    if result is not None:
        return float(result.epsilon)
    wrapper = getattr(strategy, "dp", strategy)  # a server optimizer over a noised average
    fixed = (fs.DifferentialPrivacyServerSideFixedClipping, fs.DifferentialPrivacyClientSideFixedClipping)
    if isinstance(wrapper, fixed) and wrapper.noise_multiplier == 0.0:
        return math.inf  # fixed clipping with no noise: clipped, not private
    return None


def client_dp_mod(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Apply Flower's client-side clipping mod when the server's DP wrapper asks for it.

    The client-side wrappers put ``clipping_norm`` in the train config; only then is
    Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod`` run (they reject messages
    without it), so the same ClientApp serves every privacy mode.
    """
    config = msg.content.config_records.get(rk.CONFIG)
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    adaptive = str(context.run_config.get("privacy.client_clipping", "fixed")) == "adaptive"
    return (adaptiveclipping_mod if adaptive else fixedclipping_mod)(msg, context, call_next)
