"""The noise searches' results kept on disk, so a process pays a search once per machine.

Finding the noise multiplier for a target (epsilon, delta) bisects over the accountant's
epsilon, and Opacus' RDP of a subsampled Gaussian at fractional orders is a pure-Python
series: about 0.5 s an evaluation, 4-6 s a search. Every Ray actor, every job of a sweep and
the server's closing summary asked again for the same few answers (a quick 2-round run spent
16 s of its 20 in searches). The answer is a pure function of public quantities (target,
delta, sampling rate, steps, accountant, prior releases) and of the accountant's code, so it is
stored under a key made of exactly those, Opacus' version and the search method included; a
missing, unreadable or foreign entry is recomputed, never trusted. Entries are written
atomically, one file each, so processes that search side by side do not corrupt each other.

Trust: the folder is trusted as the code beside it is (it lives in the checkout unless
``FEDMER_CACHE_DIR`` moves it). An entry only sets the noise; every epsilon FedMER reports,
records in a ledger or checks against a cap is computed from the noise actually used, so a
wrong entry could not hide a spend: it would show as an epsilon above the target.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import math
import os
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any, ParamSpec

from fedmer.atomic import atomic_write
from fedmer.cache import cache_dir

__all__ = ["NOISE_CACHE_ENV", "cached_noise", "cached_on_disk"]

log = logging.getLogger(__name__)

#: ``FEDMER_NOISE_CACHE=0`` turns the disk cache off (every process searches again).
NOISE_CACHE_ENV = "FEDMER_NOISE_CACHE"
_SCHEMA = 1
P = ParamSpec("P")


def cached_on_disk(method: str) -> Callable[[Callable[P, float]], Callable[P, float]]:
    """Decorate a pure noise search: the same arguments read the answer an earlier process stored.

    The key is ``method`` (what the search does: a changed tolerance must not read the old
    answers) and every argument by name, defaults applied.
    """

    def decorate(search: Callable[P, float]) -> Callable[P, float]:
        signature = inspect.signature(search)

        @functools.wraps(search)
        def searched(*args: P.args, **kwargs: P.kwargs) -> float:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return cached_noise({"search": method, **bound.arguments}, lambda: search(*args, **kwargs))

        return searched

    return decorate


def cached_noise(key: dict[str, Any], search: Callable[[], float]) -> float:
    """``search()``'s result for ``key``, read from disk when an earlier process stored it."""
    if os.environ.get(NOISE_CACHE_ENV, "1") == "0":
        return search()
    blob = json.dumps({"schema": _SCHEMA, "opacus": version("opacus"), **key}, sort_keys=True)
    full = json.loads(blob)  # as it reads back: tuples become lists
    path = cache_dir("noise") / f"{hashlib.sha256(blob.encode()).hexdigest()[:32]}.json"
    stored = _read(path, full)
    if stored is not None:
        return stored
    noise = search()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda fh: json.dump({"key": full, "noise": noise}, fh))
    except OSError as err:  # a read-only home still runs, it only searches again next time
        log.warning("could not store the noise search in %s: %s", path, err)
    return noise


def _read(path: Path, key: dict[str, Any]) -> float | None:
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not there yet, or torn/corrupt: search again (and overwrite it)
    if not isinstance(entry, dict):
        entry = {}
    noise = entry.get("noise")
    if entry.get("key") != key or not isinstance(noise, float) or not math.isfinite(noise) or noise <= 0:
        log.warning("ignoring a noise cache entry that is not a valid answer for its key: %s", path)
        return None
    return noise
