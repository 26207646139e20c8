"""Client-level DP with a server optimizer: noise the average first, then take the server step.

Flower's fixed-clipping accountant only accepts a strategy whose aggregation *is*
``FedAvg.aggregate_train``, because its noise is calibrated to the sensitivity of a plain
mean of clipped updates (C / n). Wrapping FedAvgM or FedAdam directly would add that noise
*after* the momentum/Adam step, whose sensitivity is different, so Flower rightly refuses.

The correct order (DP-FedAvg with server momentum, McMahan et al. 2018, "Learning
Differentially Private Recurrent Language Models") is: clip, average, add noise, and only
then let the server optimizer consume the noised average. The optimizer then only
post-processes released values, so it costs no privacy and Flower's accountant stays exact.

We get that order without copying either class: :class:`_NoisedAverage` is a FedAvg whose
``aggregate_train`` returns what Flower's DP wrapper (around a plain FedAvg) releases, and
``noised_server_optimizer(FedAvgM)`` builds ``class X(FedAvgM, _NoisedAverage)``. FedAvgM's
``super().aggregate_train`` then resolves to the noised average (Python's MRO places
``_NoisedAverage`` between FedAvgM and FedAvg), and FedAvgM's own momentum code runs on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as fs

__all__ = ["SERVER_OPTIMIZERS", "noised_server_optimizer"]

log = logging.getLogger(__name__)

#: Flower strategies that are "FedAvg, then a server optimizer step" (``super()`` to FedAvg).
SERVER_OPTIMIZERS: tuple[type[fs.FedAvg], ...] = (fs.FedAvgM, fs.FedAdam, fs.FedYogi, fs.FedAdagrad)


class _NoisedAverage(fs.FedAvg):
    """FedAvg whose sampling and averaging are delegated to a Flower DP wrapper.

    Only meaningful as the base below a server optimizer (see the module docstring).
    """

    dp: fs.Strategy

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # The DP wrapper records the current model (server-side clipping measures updates
        # against it), asks its inner FedAvg to sample, and opens the round's privacy event.
        return self.dp.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.dp.aggregate_train(server_round, replies)

    def privacy_spent(self) -> object:
        """The DP wrapper's cumulative spend (Flower's accountant), for epsilon reporting."""
        spent = getattr(self.dp, "privacy_spent", None)
        return spent() if callable(spent) else None


def noised_server_optimizer(
    optimizer_cls: type[fs.FedAvg], dp: fs.Strategy, build: Callable[[type], fs.FedAvg]
) -> fs.FedAvg:
    """An ``optimizer_cls`` (e.g. FedAvgM) whose server step consumes ``dp``'s noised average.

    ``dp`` must be a Flower DP wrapper around a plain ``FedAvg`` (what its accountant needs);
    ``build(cls)`` instantiates ``cls`` with the optimizer's own arguments (the registry's
    factory, so the settings are the same as without DP).
    """
    if optimizer_cls not in SERVER_OPTIMIZERS:
        names = ", ".join(c.__name__ for c in SERVER_OPTIMIZERS)
        raise ValueError(f"{optimizer_cls.__name__} is not a FedAvg-based server optimizer ({names})")
    composed = type(f"DP{optimizer_cls.__name__}", (optimizer_cls, _NoisedAverage), {})
    strategy = build(composed)
    if not isinstance(strategy, _NoisedAverage):  # unreachable: build(cls) instantiates cls
        raise TypeError(f"build({composed.__name__}) returned a {type(strategy).__name__}")
    strategy.dp = dp
    log.info(
        "client-level DP: %s steps on the noised average released by %s",
        optimizer_cls.__name__,
        type(dp).__name__,
    )
    return strategy
