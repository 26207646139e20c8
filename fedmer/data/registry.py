"""Name -> dataset loader, plus per-process caches so clients don't rebuild data each round.

Flower's ClientApp is called once per round per client, often in the same process;
regenerating and repartitioning every time would dominate small simulations. The
caches are keyed by the frozen config sections that determine the data, so a
changed config can never be served stale data. Cached arrays are shared: callers
must treat them as read-only.

A dataset that can build one site alone registers :class:`SiteLoaders` (the synthetic one
does). Under ``partition.scheme=site`` a client then builds its own site and nothing else, the
server builds only its fixed-size held-out set, and the partition sizes come from a count, not
from data: with 10,000 registered clients no process builds 10,000 partitions. Every other
dataset or scheme builds the whole pool once per process, as before (the real datasets are
small and fixed; ``dirichlet`` deals every class over every client, a global operation).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedmer import registry
from fedmer.config import MODALITIES, ConfigError, DataConfig, ExperimentConfig, PartitionConfig
from fedmer.data.base import DatasetSplit, MultimodalDataset, concat_datasets
from fedmer.data.partition import check_client_sizes, client_modalities, partition_clients
from fedmer.data.synthetic import generate_synthetic, synthetic_site, synthetic_site_size, synthetic_test

__all__ = [
    "CLIENT_CACHE_SIZE",
    "DatasetLoader",
    "SiteLoaders",
    "available_datasets",
    "check_partitions",
    "clear_data_cache",
    "load_calibration_set",
    "load_client_dataset",
    "load_split",
    "load_test_set",
    "partition_sizes",
    "register_dataset",
    "sites_built",
]

#: A loader builds the train/test split from the data section, the number of sites and a seed.
DatasetLoader = Callable[[DataConfig, int, int], DatasetSplit]
#: Clients whose data one process keeps (a Ray actor serves many partitions over a run): bounded,
#: so an actor's memory does not grow with the number of distinct clients it has trained.
CLIENT_CACHE_SIZE = 32


@dataclass(frozen=True)
class SiteLoaders:
    """How a dataset builds one site alone: what lets each process build only the data it uses.

    ``site(data, num_sites, seed, site)`` is the training data of one site, equal to that
    site's rows of the full loader's pool; ``test(data, num_sites, seed)`` the held-out set the
    full loader returns; ``size(data, num_sites, site)`` the length of ``site(...)``, counted
    without building anything.
    """

    site: Callable[[DataConfig, int, int, int], MultimodalDataset]
    test: Callable[[DataConfig, int, int], MultimodalDataset]
    size: Callable[[DataConfig, int, int], int]


def register_dataset(
    name: str, modalities: tuple[str, ...] = MODALITIES, sites: SiteLoaders | None = None
) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: make ``loader`` available as ``data.name=<name>``, recording ``modalities``.

    ``modalities`` are what the dataset records, in canonical order: what ``data.modalities``
    may select from (``all`` selects every one). ``sites``, when given, builds one site alone
    (see :class:`SiteLoaders`).
    """
    return registry.DATASETS.register(name, modalities=tuple(modalities), sites=sites)


def available_datasets() -> tuple[str, ...]:
    """Registered dataset names, sorted."""
    return registry.DATASETS.names()


register_dataset(
    "synthetic",
    sites=SiteLoaders(site=synthetic_site, test=synthetic_test, size=synthetic_site_size),
)(generate_synthetic)


def _sites(cfg: ExperimentConfig) -> SiteLoaders | None:
    """The dataset's per-site builders when this config can use them (``partition.scheme=site``)."""
    if cfg.partition.scheme != "site":
        return None
    sites: SiteLoaders | None = registry.DATASETS.meta(cfg.data.name).get("sites")
    return sites


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


@functools.lru_cache(maxsize=CLIENT_CACHE_SIZE)
def _site_client(
    data: DataConfig, partition: PartitionConfig, num_clients: int, seed: int, pid: int
) -> MultimodalDataset:
    """Client ``pid`` from its site alone: the same data as ``_partitions(...)[pid]``."""
    sites: SiteLoaders = registry.DATASETS.meta(data.name)["sites"]
    client = sites.site(data, num_clients, seed, pid)
    check_client_sizes([len(client)], partition, num_clients, first=pid)
    return client_modalities(client, partition, seed, pid)


@functools.lru_cache(maxsize=8)
def _site_test(data: DataConfig, num_sites: int, seed: int) -> MultimodalDataset:
    sites: SiteLoaders = registry.DATASETS.meta(data.name)["sites"]
    return sites.test(data, num_sites, seed)


def sites_built(cfg: ExperimentConfig) -> int:
    """Sites the dataset is built with: one per client, then ``data.calibration_sites`` more.

    The calibration sites come last, so the clients' sites (and the held-out persons) are those
    of a run with ``num_clients + calibration_sites`` clients.
    """
    return cfg.federation.num_clients + cfg.data.calibration_sites


def load_split(cfg: ExperimentConfig) -> DatasetSplit:
    """Train pool and held-out test persons; one site per client (``federation.num_clients``),
    then the calibration sites (``data.calibration_sites``, in ``train`` too).

    This builds every client's data: the server and the clients use :func:`load_test_set` and
    :func:`load_client_dataset`, which build only what they need.
    """
    return _split(cfg.data, sites_built(cfg), cfg.seed)


def load_calibration_set(cfg: ExperimentConfig) -> MultimodalDataset:
    """The training persons of the calibration sites (``data.standardize=calibration``), as
    recorded: the server's own recordings, which no client holds and no client trains on."""
    n, k = cfg.federation.num_clients, cfg.data.calibration_sites
    if k < 1:
        raise ConfigError(
            f"invalid data.calibration_sites={k!r}: a calibration set needs at least one calibration site"
        )
    sites = _sites(cfg)
    if sites is not None:
        return concat_datasets([sites.site(cfg.data, n + k, cfg.seed, pid) for pid in range(n, n + k)])
    train = load_split(cfg).train
    ids = np.unique(train.site)
    if len(ids) != n + k:
        raise ConfigError(
            f"data.calibration_sites={k} needs {n + k} sites, but {cfg.data.name} built {len(ids)}"
        )
    return train.subset(np.flatnonzero(np.isin(train.site, ids[n:])))


def load_test_set(cfg: ExperimentConfig) -> MultimodalDataset:
    """The server's held-out persons (``load_split(cfg).test``), built without the training pool
    where the dataset can (cached per process)."""
    if registry.DATASETS.meta(cfg.data.name).get("sites") is not None:
        return _site_test(cfg.data, sites_built(cfg), cfg.seed)
    return load_split(cfg).test


def load_client_dataset(cfg: ExperimentConfig, partition_id: int) -> MultimodalDataset:
    """The training data of client ``partition_id`` (cached per process)."""
    n = cfg.federation.num_clients
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) or not 0 <= partition_id < n:
        raise ConfigError(
            f"invalid partition_id={partition_id!r}: expected an integer in 0..{n - 1} because "
            f"federation.num_clients={n}; make the Flower node config (partition-id / num-partitions, "
            "or num-supernodes) agree with federation.num_clients"
        )
    if _sites(cfg) is not None:
        return _site_client(cfg.data, cfg.partition, sites_built(cfg), cfg.seed, partition_id)
    return _partitions(cfg.data, cfg.partition, sites_built(cfg), cfg.seed)[partition_id]


def partition_sizes(cfg: ExperimentConfig) -> list[int]:
    """Every client's number of training samples, by partition id.

    Counted without building any client's data where the dataset can build sites alone
    (``partition.scheme=site``); otherwise every partition is built (and cached).
    """
    n = cfg.federation.num_clients
    sites = _sites(cfg)
    if sites is None:
        return [len(c) for c in _partitions(cfg.data, cfg.partition, sites_built(cfg), cfg.seed)[:n]]
    return [sites.size(cfg.data, sites_built(cfg), pid) for pid in range(n)]


def check_partitions(cfg: ExperimentConfig) -> list[int]:
    """Fail before round 1 if a client would be too small or the data config is bad; the sizes.

    The held-out set is built (it is small, and the server needs it anyway), so a data config
    that cannot be generated fails here too.
    """
    sizes = partition_sizes(cfg)
    check_client_sizes(sizes, cfg.partition, cfg.federation.num_clients)
    load_test_set(cfg)
    return sizes


def clear_data_cache() -> None:
    """Forget cached splits, partitions and test sets (tests, or after registering a new loader)."""
    for cache in (_split, _partitions, _site_client, _site_test):
        cache.cache_clear()
