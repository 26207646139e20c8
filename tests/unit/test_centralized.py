"""The centralised reference: pooled client data, the configured model, the held-out persons."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmer.config import ConfigError
from fedmer.data.base import concat_datasets
from fedmer.data.registry import load_client_dataset, load_split
from fedmer.training.centralized import default_epochs, pooled_training_data, train_centralized
from simulations.run import experiment_from_hydra
from tests.conftest import compose

SMALL = [
    "data.persons_per_site=2",
    "data.sequences_per_person=16",
    "federation.num_clients=3",
    "federation.num_rounds=3",
    "federation.local_epochs=2",
    "federation.batch_size=16",
    "privacy=off",
]


@pytest.fixture(scope="module")
def exp():
    return experiment_from_hydra(compose(SMALL))


def test_pooled_data_is_exactly_the_clients_partitions(exp) -> None:
    pooled = pooled_training_data(exp)
    parts = [load_client_dataset(exp, i) for i in range(exp.federation.num_clients)]
    assert len(pooled) == sum(len(p) for p in parts) == len(load_split(exp).train)
    np.testing.assert_array_equal(pooled.x, np.concatenate([p.x for p in parts]))
    np.testing.assert_array_equal(pooled.y, np.concatenate([p.y for p in parts]))
    assert set(pooled.person.tolist()).isdisjoint(load_split(exp).test.person.tolist())


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=96), min_size=1, max_size=4))
def test_concat_of_consecutive_subsets_restores_the_dataset(cuts: list[int]) -> None:
    data = load_split(experiment_from_hydra(compose(SMALL))).train
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    parts = [data.subset(np.arange(a, b)) for a, b in itertools.pairwise(bounds)]
    joined = concat_datasets(parts)
    for field in ("x", "mask", "y", "person", "site"):
        np.testing.assert_array_equal(getattr(joined, field), getattr(data, field))
    assert joined.modalities == data.modalities and joined.class_names == data.class_names


def test_concat_rejects_mismatched_or_empty_input(exp) -> None:
    data = load_split(exp).train
    other = dataclasses.replace(data, class_names=tuple(f"c{i}" for i in range(data.num_classes)))
    with pytest.raises(ValueError, match="class_names"):
        concat_datasets([data, other])
    with pytest.raises(ValueError, match="at least one"):
        concat_datasets([])


def test_trains_the_planned_budget_and_learns_above_chance(exp) -> None:
    result = train_centralized(exp)
    assert result["epochs"] == default_epochs(exp) == 6
    assert [p["epoch"] for p in result["curve"]] == [2, 4, 6]  # one point per round equivalent
    assert result["uar"] == result["curve"][-1]["uar"]
    assert result["best_uar"] >= result["uar"]
    assert result["train_samples"] == len(pooled_training_data(exp))
    assert result["test_samples"] == len(load_split(exp).test)
    assert result["uar"] > result["chance_uar"] + 0.1  # the synthetic data is learnable
    assert result["curve"][-1]["train_loss"] < result["curve"][0]["train_loss"]
    complete = int(load_split(exp).test.mask.all(axis=1).sum())
    assert result["complete_test_samples"] == complete
    assert (result["complete_uar"] is None) == (complete in (0, result["test_samples"]))


def test_is_deterministic_in_the_seed(exp) -> None:
    a, b = train_centralized(exp, epochs=2), train_centralized(exp, epochs=2)
    assert a["curve"] == b["curve"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_epochs_is_a_config_error(exp, bad) -> None:
    with pytest.raises(ConfigError, match="epochs"):
        train_centralized(exp, epochs=bad)
