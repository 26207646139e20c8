"""Split the training pool across federated clients, optionally taking sensors away.

Two schemes: ``site`` is the natural federation (one vehicle or hospital per client,
heterogeneous persons, sensors and label mixes), ``dirichlet`` is the standard label-skew
benchmark: every class's samples are spread over clients with Dirichlet(alpha)
proportions, sample by sample (a person's sequences may land at several clients).
On top, ``modality_missing_rate`` removes whole modalities from a client, as in
FedMultimodal: a client either has a sensor for all its samples or not at all.
Everything is deterministic in ``seed`` (modality dropping per client, so a client built
alone matches the same client built with all: see ``fedmer.data.registry``); too-small
clients are a ConfigError rather than a silent skip, since an empty client breaks DP
accounting and FedAvg weights.
"""

from __future__ import annotations

import logging

import numpy as np

from fedmer.config import ConfigError, PartitionConfig
from fedmer.data.base import MultimodalDataset

__all__ = [
    "check_client_sizes",
    "client_modalities",
    "drop_modalities",
    "partition_clients",
    "partition_indices",
]

_log = logging.getLogger(__name__)

# Stream tags so partitioning never reuses the random numbers of data generation.
_DIRICHLET_STREAM = 101
_MISSING_STREAM = 202


def _check_num_clients(num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"invalid federation.num_clients={num_clients!r}: expected a positive integer")


def _site_indices(train: MultimodalDataset, num_clients: int) -> list[np.ndarray]:
    """Client i holds the i-th smallest site id."""
    sites = np.unique(train.site)
    if len(sites) != num_clients:
        raise ConfigError(
            f"partition.scheme=site needs one site per client, but the training data has {len(sites)} "
            f"sites and federation.num_clients={num_clients}; generate the data with as many sites as "
            "clients (fedmer.data.load_split does), set federation.num_clients to the number of sites, "
            "or use partition.scheme=dirichlet"
        )
    return [np.flatnonzero(train.site == s) for s in sites]


def _dirichlet_indices(
    train: MultimodalDataset, alpha: float, num_clients: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per class, cut a shuffled index list at Dirichlet(alpha) proportions."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in np.unique(train.y):
        idx = rng.permutation(np.flatnonzero(train.y == c))
        share = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.round(np.cumsum(share)[:-1] * len(idx)).astype(np.int64)
        for client, chunk in enumerate(np.split(idx, cuts)):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def partition_indices(
    train: MultimodalDataset, cfg: PartitionConfig, num_clients: int, seed: int
) -> list[np.ndarray]:
    """Sorted training-sample indices of every client; together they cover each sample once."""
    _check_num_clients(num_clients)
    if cfg.scheme == "site":
        index = _site_indices(train, num_clients)
    elif cfg.scheme == "dirichlet":
        rng = np.random.default_rng([seed, _DIRICHLET_STREAM])
        index = _dirichlet_indices(train, cfg.alpha, num_clients, rng)
    else:  # PartitionConfig validates, so only a hand-built object gets here
        raise ConfigError(f"invalid partition.scheme={cfg.scheme!r}: expected site or dirichlet")
    check_client_sizes([len(idx) for idx in index], cfg, num_clients)
    return index


def check_client_sizes(sizes: list[int], cfg: PartitionConfig, num_clients: int, first: int = 0) -> None:
    """ConfigError naming the first client with fewer than ``partition.min_samples`` samples.

    ``sizes`` are clients ``first``, ``first + 1``, ... (a client built alone passes its own id).

    An empty or tiny client breaks DP accounting and FedAvg weights, so it stops the run
    before round 1 instead of being skipped.
    """
    how = f"partition.scheme={cfg.scheme}"
    if cfg.scheme == "dirichlet":
        how += f" with partition.alpha={cfg.alpha}"
    for client, size in enumerate(sizes, start=first):
        if size < cfg.min_samples:
            raise ConfigError(
                f"client {client} gets {size} training samples under {how} "
                f"(num_clients={num_clients}), fewer than partition.min_samples={cfg.min_samples}; "
                "raise partition.alpha, use fewer clients (federation.num_clients), generate more "
                "data (data.persons_per_site / data.sequences_per_person) or lower partition.min_samples"
            )


def drop_modalities(client: MultimodalDataset, rate: float, rng: np.random.Generator) -> MultimodalDataset:
    """Remove each modality from the whole client with probability ``rate``.

    Modalities are restored greedily (the one covering most emptied samples first)
    until no sample that had a modality is left with none, so neither the client nor
    any of its samples ends up blind. Under ``site`` all of a client's samples share
    one sensor kit, so this is just "keep at least one modality the client had".
    """
    drop = rng.random(int(client.mask.shape[1])) < rate
    keep = ~drop
    while True:
        mask = client.mask & keep[None, :]
        blind = client.mask.any(axis=1) & ~mask.any(axis=1)
        if not blind.any():
            break
        cover = np.where(keep, -1, client.mask[blind].sum(axis=0))
        keep[int(np.argmax(cover))] = True
    return client.with_mask(mask)


def client_modalities(
    client: MultimodalDataset, cfg: PartitionConfig, seed: int, pid: int
) -> MultimodalDataset:
    """Client ``pid``'s data after ``partition.modality_missing_rate``.

    The draw comes from the client's own stream, so a client built alone loses the same
    modalities as when every client is built together.
    """
    if cfg.modality_missing_rate <= 0:
        return client
    return drop_modalities(
        client, cfg.modality_missing_rate, np.random.default_rng([seed, _MISSING_STREAM, pid])
    )


def partition_clients(
    train: MultimodalDataset, cfg: PartitionConfig, num_clients: int, seed: int
) -> list[MultimodalDataset]:
    """One dataset per client (see the module docstring for the schemes)."""
    index = partition_indices(train, cfg, num_clients, seed)
    clients = [client_modalities(train.subset(idx), cfg, seed, i) for i, idx in enumerate(index)]
    for i, c in enumerate(clients):
        classes = np.bincount(c.y, minlength=c.num_classes).tolist()
        present = c.mask.any(axis=0).astype(int).tolist()
        _log.debug("client %d: %d samples, classes %s, modalities present %s", i, len(c), classes, present)
    return clients
