"""Content digests for the on-disk feature caches.

A cache keyed on a file's size and mtime serves stale features after a same-size edit or a
copy that keeps times (``cp -p``, ``rsync -a``). Every FedMER feature cache keys on the bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["file_digest"]


def file_digest(path: Path) -> str:
    """SHA-256 of the file's bytes (read in 1 MiB blocks); ``"missing"`` for an absent file."""
    if not path.exists():
        return "missing"
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
