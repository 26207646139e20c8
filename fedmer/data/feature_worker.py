"""Fill the RAVDESS speech feature cache for some actors, in a process of its own.

    python -m fedmer.data.feature_worker [--clips=ID,ID,...] KIND SEQ_LEN LEVEL_NORM CACHE_DIR ACTOR_DIR...

:func:`fedmer.data.ravdess.speech_of_actors` starts one per core when the cache is cold. A
plain subprocess, not a multiprocessing pool: a pool's workers re-import the caller's main
module (a user's script, ``python -``), and that is not ours to run again.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedmer.data.audio_features import build_audio_frontend
from fedmer.data.ravdess import load_actor_speech

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Extract and cache each actor folder (only the clips ``--clips`` names, if given); 0 when all
    are cached."""
    clips = None
    if argv and argv[0].startswith("--clips="):
        clips = frozenset(argv[0].removeprefix("--clips=").split(","))
        argv = argv[1:]
    kind, seq_len, level_norm, cache_dir, *folders = argv
    if level_norm not in ("0", "1"):
        raise ValueError(f"invalid LEVEL_NORM={level_norm!r}: expected 0 or 1")
    frontend = build_audio_frontend(kind, int(seq_len), level_norm=level_norm == "1")
    for folder in folders:
        load_actor_speech(Path(folder), frontend, Path(cache_dir), clips=clips)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
