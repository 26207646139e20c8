"""Name -> dataset loader, plus per-process caches so clients don't rebuild data each round.

Flower's ClientApp is called once per round per client, often in the same process;
regenerating and repartitioning every time would dominate small simulations. The
caches are keyed by the frozen config sections that determine the data, so a
changed config can never be served stale data. Cached arrays are shared: callers
must treat them as read-only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from fedmer import registry
from fedmer.config import MODALITIES, ConfigError, DataConfig, ExperimentConfig, PartitionConfig
from fedmer.data.base import DatasetSplit, MultimodalDataset
from fedmer.data.partition import partition_clients
from fedmer.data.synthetic import generate_synthetic

__all__ = [
    "DatasetLoader",
    "available_datasets",
    "check_partitions",
    "clear_data_cache",
    "load_client_dataset",
    "load_split",
    "register_dataset",
]

#: A loader builds the train/test split from the data section, the number of sites and a seed.
DatasetLoader = Callable[[DataConfig, int, int], DatasetSplit]

def register_dataset(
    name: str, modalities: tuple[str, ...] = MODALITIES
) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: make ``loader`` available as ``data.name=<name>``, recording ``modalities``.

    ``modalities`` are what the dataset records, in canonical order: what ``data.modalities``
    may select from (``all`` selects every one).
    """
    return registry.DATASETS.register(name, modalities=tuple(modalities))


def available_datasets() -> tuple[str, ...]:
    """Registered dataset names, sorted."""
    return registry.DATASETS.names()


register_dataset("synthetic")(generate_synthetic)


@functools.lru_cache(maxsize=8)
def _split(data: DataConfig, num_sites: int, seed: int) -> DatasetSplit:
    loader: DatasetLoader = registry.DATASETS.get(data.name)
    return loader(data, num_sites, seed)


@functools.lru_cache(maxsize=8)
def _partitions(
    data: DataConfig, partition: PartitionConfig, num_clients: int, seed: int
) -> tuple[MultimodalDataset, ...]:
    train = _split(data, num_clients, seed).train
    return tuple(partition_clients(train, partition, num_clients, seed))


def load_split(cfg: ExperimentConfig) -> DatasetSplit:
    """Train pool and held-out test persons; one site per client (``federation.num_clients``)."""
    return _split(cfg.data, cfg.federation.num_clients, cfg.seed)


def load_client_dataset(cfg: ExperimentConfig, partition_id: int) -> MultimodalDataset:
    """The training data of client ``partition_id`` (cached per process)."""
    n = cfg.federation.num_clients
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) or not 0 <= partition_id < n:
        raise ConfigError(
            f"invalid partition_id={partition_id!r}: expected an integer in 0..{n - 1} because "
            f"federation.num_clients={n}; make the Flower node config (partition-id / num-partitions, "
            "or num-supernodes) agree with federation.num_clients"
        )
    return _partitions(cfg.data, cfg.partition, n, cfg.seed)[partition_id]


def check_partitions(cfg: ExperimentConfig) -> list[int]:
    """Build every client's partition once, so a bad partition fails before round 1; their sizes."""
    return [len(load_client_dataset(cfg, pid)) for pid in range(cfg.federation.num_clients)]


def clear_data_cache() -> None:
    """Forget cached splits and partitions (tests, or after registering a new loader)."""
    _split.cache_clear()
    _partitions.cache_clear()
