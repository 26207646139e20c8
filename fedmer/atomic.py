"""Atomic file replacement: what a crash leaves is the old file or the new one, never half.

The privacy ledger and the run checkpoint must both survive a kill mid-write (a half ledger
would forget spent privacy; a half checkpoint would make a run unresumable), so both write
through :func:`atomic_write`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write"]


def atomic_write(path: Path, write: Callable[[IO[Any]], object], *, binary: bool = False) -> Path:
    """Call ``write(fh)`` on a temp file beside ``path``, fsync it, rename it over ``path``, fsync
    the folder (where the OS allows); on any error the temp file is removed and ``path`` untouched."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        fh: IO[Any]
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # a folder fsync is not possible everywhere
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path
