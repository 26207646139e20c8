"""Where FedMER keeps what it can recompute: feature caches and the noise-search results.

One root for every cache: ``$FEDMER_CACHE_DIR`` when set, else ``<repo>/.fedmer_cache``
(gitignored). Deleting it costs time, never a result.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["REPO_ROOT", "cache_dir"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_dir(name: str) -> Path:
    """``$FEDMER_CACHE_DIR/<name>``, else ``<repo>/.fedmer_cache/<name>`` (not created here)."""
    return Path(os.environ.get("FEDMER_CACHE_DIR", REPO_ROOT / ".fedmer_cache")) / name
