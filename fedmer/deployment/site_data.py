"""Demo site files: each site of a run's dataset written as its own ``.npz`` data file.

A pilot on one machine needs what real sites have, their own files; this cuts a dataset the
way a simulation would (one partition per site) and writes each part where that site's node
reads it (``data-file``). Real sites write theirs with their own front-end and
:func:`fedmer.data.site_file.save_site_file`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedmer.config import ExperimentConfig
from fedmer.data.registry import load_client_dataset
from fedmer.data.site_file import save_site_file

__all__ = ["write_site_files"]


def write_site_files(cfg: ExperimentConfig, sites: Sequence[str], out: str | Path) -> dict[str, Path]:
    """``<out>/<site>/data.npz`` for every site, site ``i`` holding partition ``i`` of ``cfg``."""
    if len(sites) != cfg.federation.num_clients:
        raise ValueError(
            f"{len(sites)} site(s) {list(sites)} but federation.num_clients={cfg.federation.num_clients}: "
            "give one site per client"
        )
    out = Path(out)
    files = {}
    for i, site in enumerate(sites):
        files[site] = save_site_file(load_client_dataset(cfg, i), out / site / "data.npz")
    return files
