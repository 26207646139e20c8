"""A Hydra sweeper over a union of grids: several cartesian products in one ``-m`` sweep.

Hydra's basic sweeper runs one cartesian product. An experiment such as the privacy/accuracy
frontier is several: DP-SGD over (dataset x epsilon), one no-DP reference per dataset (crossing
it with epsilon would run it six times), client-level DP over a fleet-size axis. Each is a
``grids`` entry; ``params`` holds what every grid shares (e.g. the seeds), and the command line
overrides both, as it overrides the basic sweeper's params::

    hydra:
      sweeper:
        _target_: hydra_plugins.fedmer_union_sweeper.union_sweeper.UnionSweeper
        params: {seed: "0,1,2"}
        grids:
          dp: {privacy: sample, privacy.target_epsilon: "1,8"}
          reference: {privacy: "off"}

A job that two grids both produce runs once. ``select`` runs some grids only (e.g.
``hydra.sweeper.select=[dp]``; default: all). Only the job list is this sweeper's own: the
sweep itself (batches, validation, the launcher, callbacks, a failed job failing the sweep) is
the basic sweeper's ``sweep``, unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override

__all__ = ["UnionSweeper", "UnionSweeperConf", "union_jobs"]

log = logging.getLogger(__name__)


@dataclass
class UnionSweeperConf:
    """``hydra/sweeper=union``: ``grids`` (name -> key -> comma-separated values), shared ``params``."""

    _target_: str = "hydra_plugins.fedmer_union_sweeper.union_sweeper.UnionSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = None
    grids: dict[str, dict[str, str]] = field(default_factory=dict)
    select: list[str] | None = None


ConfigStore.instance().store(group="hydra/sweeper", name="union", node=UnionSweeperConf)


def _pairs(values: Mapping[str, Any] | None) -> list[str]:
    return [f"{key}={value}" for key, value in (values or {}).items()]


def union_jobs(
    grids: Mapping[str, Mapping[str, Any]],
    params: Mapping[str, Any] | None,
    arguments: Sequence[str],
    parser: OverridesParser | None = None,
    select: Sequence[str] | None = None,
) -> list[list[str]]:
    """Every job's overrides: each (selected) grid's cartesian product, grids in order, each job once.

    Precedence inside one job: ``params`` < the grid's own values < ``arguments`` (the command line).
    """
    if not grids:
        raise ValueError("hydra.sweeper.grids is empty: name at least one grid (key -> values)")
    if select is not None:
        unknown = [name for name in select if name not in grids]
        if unknown or not select:
            raise ValueError(
                f"invalid hydra.sweeper.select={list(select)}: expected a non-empty list of the "
                f"grids {', '.join(grids)}"
            )
        grids = {name: grids[name] for name in grids if name in select}
    parser = parser or OverridesParser.create()
    jobs: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for name, grid in grids.items():
        if not grid:
            raise ValueError(f"hydra.sweeper.grids.{name} is empty: give it at least one key")
        parsed = parser.parse_overrides([*_pairs(params), *_pairs(grid), *arguments])
        # later overrides of a key replace earlier ones (the basic sweeper's own rule)
        for batch in BasicSweeper.split_arguments(parsed, None):
            for job in batch:
                key = tuple(sorted(job))
                if key not in seen:
                    seen.add(key)
                    jobs.append(list(job))
    return jobs


class UnionSweeper(BasicSweeper):
    """The basic sweeper, over the union of ``grids`` instead of one product."""

    def __init__(
        self,
        max_batch_size: int | None = None,
        params: Mapping[str, str] | None = None,
        grids: Mapping[str, Mapping[str, str]] | None = None,
        select: Sequence[str] | None = None,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=dict(params or {}))
        self.grids = {str(k): dict(v) for k, v in (grids or {}).items()}
        self.select = None if select is None else [str(name) for name in select]

    def _parse_config(self) -> list[str]:
        """No overrides ahead of the command line's: ``params`` enter each grid in :meth:`split_arguments`."""
        return []

    def split_arguments(  # type: ignore[override]  # the basic sweeper's is static; this one reads the grids
        self, overrides: list[Override], max_batch_size: int | None
    ) -> list[list[list[str]]]:
        """The basic sweeper's batches, over the union of the grids (``overrides``: the command line)."""
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        arguments = [o.input_line for o in overrides if o.input_line is not None]
        jobs = union_jobs(self.grids, self.params, arguments, parser, self.select)
        log.info("union sweep: %d jobs", len(jobs))
        size = max_batch_size or len(jobs)
        return [jobs[i : i + size] for i in range(0, len(jobs), size)]
