"""FedMER's Hydra sweeper plugin (``hydra/sweeper=union``): a sweep over a union of grids.

Hydra instantiates sweepers only from the ``hydra_plugins`` namespace package, so it lives here.
"""

from hydra_plugins.fedmer_union_sweeper.union_sweeper import UnionSweeper, UnionSweeperConf, union_jobs

__all__ = ["UnionSweeper", "UnionSweeperConf", "union_jobs"]
