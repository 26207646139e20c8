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

import logging
from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp import strategy as fs
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod
from flwr.supercore.privacy_accounting import PrivacyConfig as FlowerPrivacyConfig
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedmer import records as rk
from fedmer.config import ConfigError, ExperimentConfig

__all__ = ["client_dp_mod", "client_level_epsilon", "wrap_client_level_dp"]

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
            return cls(inner, p.client_noise_multiplier, n, initial_clipping_norm=p.update_clip_norm)
        except ValueError as err:  # Flower checks the noise it can split off for the clipped count
            raise ConfigError(
                f"invalid privacy.client_noise_multiplier={p.client_noise_multiplier!r} for adaptive "
                f"clipping with {n} clients per round: {err} (more clients per round or less noise)"
            ) from err
    accountant = RdpAccountant(
        FlowerPrivacyConfig(
            target_delta=p.delta,
            population_size=cfg.federation.num_clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    cls = (
        fs.DifferentialPrivacyServerSideFixedClipping
        if server_side
        else fs.DifferentialPrivacyClientSideFixedClipping
    )
    return cls(inner, p.client_noise_multiplier, p.update_clip_norm, n, accountant=accountant)


def client_level_epsilon(strategy: fs.Strategy) -> float | None:
    """Cumulative client-level epsilon (at the accountant's delta), or None when not accounted."""
    spent = getattr(strategy, "privacy_spent", None)
    result = spent() if callable(spent) else None
    return None if result is None else float(result.epsilon)


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
