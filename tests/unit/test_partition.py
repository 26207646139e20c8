"""Client partitioning, modality dropping and the dataset registry."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmer.config import ConfigError, DataConfig, ExperimentConfig, FederationConfig, PartitionConfig
from fedmer.data import registry
from fedmer.data.base import DatasetSplit, MultimodalDataset
from fedmer.data.partition import partition_clients, partition_indices
from fedmer.data.synthetic import generate_synthetic
from fedmer.registry import DATASETS


@functools.lru_cache(maxsize=4)
def _split(num_sites: int = 10, seed: int = 0) -> DatasetSplit:
    return generate_synthetic(DataConfig(), num_sites, seed)


def _assert_exact_cover(index: list[np.ndarray], n: int) -> None:
    every = np.concatenate(index)
    assert len(every) == n and np.array_equal(np.sort(every), np.arange(n))


def _assert_whole_client_drop(before: MultimodalDataset, after: MultimodalDataset) -> None:
    kept = after.mask.any(axis=0)
    assert np.array_equal(after.mask, before.mask & kept[None, :]), "a modality goes for all samples"
    for j, (a, b) in enumerate(after.feature_slices):
        assert not after.x[~after.mask[:, j], :, a:b].any()
        assert np.array_equal(after.x[after.mask[:, j], :, a:b], before.x[after.mask[:, j], :, a:b])
    had = before.mask.any(axis=1)
    assert after.mask[had].any(axis=1).all(), "no sample (hence no client) left without a modality"


def test_site_scheme_gives_each_client_its_site() -> None:
    split = _split()
    index = partition_indices(split.train, PartitionConfig(), 10, seed=0)
    _assert_exact_cover(index, len(split.train))
    clients = partition_clients(split.train, PartitionConfig(), 10, seed=0)
    test_persons = set(split.test.person.tolist())
    for i, (idx, client) in enumerate(zip(index, clients, strict=True)):
        assert set(client.site.tolist()) == {i}
        assert np.array_equal(client.x, split.train.x[idx]) and np.array_equal(client.y, split.train.y[idx])
        assert not set(client.person.tolist()) & test_persons


def test_site_scheme_with_wrong_client_count_names_both_numbers() -> None:
    with pytest.raises(ConfigError, match=r"10 sites.*num_clients=7"):
        partition_clients(_split().train, PartitionConfig(), 7, seed=0)


def test_too_small_site_names_client_and_size() -> None:
    with pytest.raises(ConfigError, match=r"client 0 gets 640 .*min_samples=1000"):
        partition_clients(_split().train, PartitionConfig(min_samples=1000), 10, seed=0)


def test_too_small_dirichlet_client_names_alpha_and_remedy() -> None:
    cfg = PartitionConfig(scheme="dirichlet", alpha=0.01)
    with pytest.raises(ConfigError, match=r"client \d+ gets \d+ .*alpha=0.01.*raise partition.alpha"):
        partition_clients(_split().train, cfg, 10, seed=0)


@pytest.mark.parametrize("bad", [0, -3, 1.5])
def test_bad_client_count_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="num_clients"):
        partition_indices(_split().train, PartitionConfig(scheme="dirichlet"), bad, seed=0)  # type: ignore[arg-type]


def _class_skew(train: MultimodalDataset, alpha: float) -> float:
    """Mean over clients of the largest class share."""
    cfg = PartitionConfig(scheme="dirichlet", alpha=alpha, min_samples=1)
    clients = partition_clients(train, cfg, 4, seed=3)
    return float(np.mean([np.bincount(c.y, minlength=c.num_classes).max() / len(c) for c in clients]))


def test_small_alpha_skews_labels_large_alpha_does_not() -> None:
    train = _split().train
    assert _class_skew(train, 0.1) > 0.55
    assert _class_skew(train, 100.0) < 0.3


def test_partition_is_deterministic_in_the_seed() -> None:
    train = _split().train
    cfg = PartitionConfig(scheme="dirichlet", alpha=1.0, modality_missing_rate=0.4)
    a, b = partition_clients(train, cfg, 6, seed=5), partition_clients(train, cfg, 6, seed=5)
    for u, v in zip(a, b, strict=True):
        assert np.array_equal(u.x, v.x) and np.array_equal(u.mask, v.mask) and np.array_equal(u.y, v.y)
    c = partition_clients(train, cfg, 6, seed=6)
    assert any(len(u) != len(v) or not np.array_equal(u.y, v.y) for u, v in zip(a, c, strict=True))


def test_missing_rate_zero_keeps_masks() -> None:
    train = _split().train
    for before, after in zip(
        partition_clients(train, PartitionConfig(), 10, 0),
        partition_clients(train, PartitionConfig(modality_missing_rate=0.0), 10, 0),
        strict=True,
    ):
        assert np.array_equal(before.mask, after.mask)


def test_missing_rate_is_honoured_per_whole_client() -> None:
    split = generate_synthetic(DataConfig(persons_per_site=1, sequences_per_person=10), 60, seed=1)
    plain = partition_clients(split.train, PartitionConfig(min_samples=1), 60, seed=1)
    cfg = PartitionConfig(modality_missing_rate=0.3, min_samples=1)
    dropped = partition_clients(split.train, cfg, 60, seed=1)
    had = np.array([c.mask.any(axis=0) for c in plain])
    kept = np.array([c.mask.any(axis=0) for c in dropped])
    for before, after in zip(plain, dropped, strict=True):
        _assert_whole_client_drop(before, after)
    rate = 1.0 - kept[had].sum() / had.sum()
    assert 0.18 < rate < 0.4, rate


@pytest.mark.parametrize("scheme", ["site", "dirichlet"])
def test_high_missing_rate_never_leaves_a_client_blind(scheme: str) -> None:
    train = _split().train
    cfg = PartitionConfig(scheme=scheme, alpha=1.0, modality_missing_rate=0.95)
    index = partition_indices(train, cfg, 10, seed=2)
    for idx, client in zip(index, partition_clients(train, cfg, 10, seed=2), strict=True):
        assert client.mask.any(axis=0).sum() >= 1
        _assert_whole_client_drop(train.subset(idx), client)


@settings(max_examples=25, deadline=None)
@given(
    num_clients=st.integers(1, 12),
    alpha=st.floats(0.05, 20.0),
    rate=st.sampled_from([0.0, 0.3, 0.8]),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_partition_invariants(num_clients: int, alpha: float, rate: float, seed: int) -> None:
    split = _split()
    cfg = PartitionConfig(scheme="dirichlet", alpha=alpha, modality_missing_rate=rate, min_samples=1)
    try:
        index = partition_indices(split.train, cfg, num_clients, seed)
    except ConfigError as err:  # an empty client: must say which and why
        assert "partition.alpha" in str(err) and "gets 0 training samples" in str(err)
        return
    _assert_exact_cover(index, len(split.train))
    clients = partition_clients(split.train, cfg, num_clients, seed)
    test_persons = set(split.test.person.tolist())
    for idx, client in zip(index, clients, strict=True):
        assert len(client) == len(idx) >= 1
        assert np.array_equal(client.y, split.train.y[idx])
        assert not set(client.person.tolist()) & test_persons
        _assert_whole_client_drop(split.train.subset(idx), client)


# -- registry ------------------------------------------------------------------------


def _experiment(num_clients: int = 4, **partition: object) -> ExperimentConfig:
    data = DataConfig(persons_per_site=2, sequences_per_person=10, seq_len=6)
    return ExperimentConfig(
        data=data,
        partition=PartitionConfig(**partition),
        federation=FederationConfig(num_clients=num_clients),
    )


def test_registry_loads_and_caches() -> None:
    registry.clear_data_cache()
    cfg = _experiment()
    assert "synthetic" in registry.available_datasets()
    split = registry.load_split(cfg)
    assert registry.load_split(cfg) is split
    assert len(np.unique(split.train.site)) == 4
    client = registry.load_client_dataset(cfg, 2)
    assert registry.load_client_dataset(cfg, 2) is client
    assert set(client.site.tolist()) == {2}
    other = registry.load_client_dataset(_experiment(modality_missing_rate=0.5), 2)
    assert other is not client and len(other) == len(client)


@pytest.mark.parametrize("pid", [-1, 4, True, 1.0])
def test_registry_rejects_bad_partition_id(pid: object) -> None:
    with pytest.raises(ConfigError, match=r"partition_id=.*0\.\.3.*num_clients=4"):
        registry.load_client_dataset(_experiment(), pid)  # type: ignore[arg-type]


def test_registry_unknown_dataset_lists_valid_names(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _experiment()
    object.__setattr__(cfg.data, "name", "nope")  # bypass DataConfig validation on purpose
    with pytest.raises(ConfigError, match=r"data.name='nope'.*synthetic"):
        registry.load_split(cfg)
    monkeypatch.setattr(DATASETS, "_entries", dict(DATASETS._entries))  # undone after the test

    @registry.register_dataset("nope")
    def load_nope(data: DataConfig, num_sites: int, seed: int) -> DatasetSplit:
        return _split(num_sites, seed)

    with pytest.raises(ValueError, match="already registered"):
        registry.register_dataset("nope")(lambda data, sites, seed: _split(sites, seed))
    registry.clear_data_cache()
    assert "nope" in registry.available_datasets()
    assert DataConfig(name="nope").name == "nope"  # the config accepts what the registry holds
    assert registry.load_split(cfg).train.x.shape[1] == 20
    registry.clear_data_cache()
