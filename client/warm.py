"""What a Ray actor does as it starts, before its first ClientApp call.

``simulations.ray_session.prestart`` starts the actors while the driver is still importing
and setting up the run; each one runs :func:`warm_up` in its constructor, so its imports
(torch, Opacus, Flower, the ClientApp) and the run's process-level caches are ready when the
first training message arrives. This module stays light: it is what the actor unpickles first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

__all__ = ["warm_up"]

log = logging.getLogger(__name__)


def warm_up(run_config: Mapping[str, object]) -> None:
    """Import the ClientApp and parse the run's config, as the first call would."""
    started = time.perf_counter()
    import client.app  # noqa: F401 - the imports are the warm-up
    from fedmer.federation.node import parse_run_config

    parse_run_config(run_config)
    log.debug("actor warmed up in %.2f s", time.perf_counter() - started)
