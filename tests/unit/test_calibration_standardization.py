"""``data.standardize=calibration``: the server's own calibration persons standardise the inputs.

Pinned here: the calibration persons are whole sites that are no client and no held-out
person; the clients and the held-out set are those of a run with that many more clients; the
model gets the exact statistics of the calibration set without asking any node; no epsilon is
spent on it and the privacy statement says that it is protected by none; bad settings fail
before training, naming the key.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedmer.config import ConfigError, ExperimentConfig
from fedmer.data.feature_stats import exact_feature_stats, read_feature_stats
from fedmer.data.registry import (
    clear_data_cache,
    load_calibration_set,
    load_client_dataset,
    load_split,
    load_test_set,
    partition_sizes,
)
from fedmer.federation.statistics import standardize_model
from fedmer.models import build_model_for
from fedmer.privacy.run_noise import dp_sgd_noise, stats_noise_multiplier, stats_prior
from fedmer.privacy.statement import privacy_statement
from fedmer.results.layout import FEATURE_STATS_JSON
from tests.conftest import NodeListGrid

FLAT = ExperimentConfig().to_run_config() | {
    "data.persons_per_site": 2,
    "data.sequences_per_person": 12,
    "federation.num_clients": 3,
    "federation.min_train_clients": 3,
    "data.standardize": "calibration",
    "data.calibration_sites": 1,
    "privacy.mode": "sample",
}


class NoNodeGrid(NodeListGrid):
    """Fails the test if the server asks any node for anything."""

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        raise AssertionError("calibration statistics must not query the nodes")


@pytest.fixture(autouse=True)
def _fresh_data_cache():
    clear_data_cache()
    yield
    clear_data_cache()


def _persons(data) -> set[int]:  # type: ignore[no-untyped-def]
    return set(np.unique(data.person).tolist())


def test_calibration_persons_are_no_client_and_no_held_out_person() -> None:
    cfg = ExperimentConfig.from_run_config(FLAT)
    calibration = load_calibration_set(cfg)
    clients = [load_client_dataset(cfg, i) for i in range(3)]
    assert len(calibration) > 0
    cal = _persons(calibration)
    for c in clients:
        assert not cal & _persons(c)
    assert not cal & _persons(load_test_set(cfg))
    # exactly the training persons of the fourth site, all of their samples
    train = load_split(cfg).train
    last = np.unique(train.site)[-1]
    assert cal == set(np.unique(train.person[train.site == last]).tolist())
    assert len(calibration) == int((train.site == last).sum())
    assert partition_sizes(cfg) == [len(c) for c in clients]


def test_clients_and_held_out_set_are_those_of_a_run_with_one_more_client() -> None:
    cfg = ExperimentConfig.from_run_config(FLAT)
    wider = ExperimentConfig.from_run_config(
        FLAT
        | {
            "federation.num_clients": 4,
            "data.standardize": "none",
            "data.calibration_sites": 0,
        }
    )
    for i in range(3):
        np.testing.assert_array_equal(load_client_dataset(cfg, i).x, load_client_dataset(wider, i).x)
    np.testing.assert_array_equal(load_test_set(cfg).person, load_test_set(wider).person)
    np.testing.assert_array_equal(load_calibration_set(cfg).x, load_client_dataset(wider, 3).x)


def test_the_server_sets_the_exact_calibration_statistics_without_asking_a_node(tmp_path) -> None:
    cfg = ExperimentConfig.from_run_config(FLAT | {"output.dir": str(tmp_path)})
    model = build_model_for(cfg, load_test_set(cfg))
    extra = standardize_model(NoNodeGrid([1, 2, 3]), cfg, model, tmp_path)
    expected = exact_feature_stats(load_calibration_set(cfg))
    written = read_feature_stats(tmp_path / FEATURE_STATS_JSON)
    assert written == expected
    assert model.standardizer is not None
    np.testing.assert_allclose(model.standardizer.shift.numpy(), np.array(expected.mean), rtol=1e-6)
    np.testing.assert_allclose(model.standardizer.scale.numpy(), 1 / np.array(expected.std), rtol=1e-5)
    info = extra["feature_stats"]
    assert info["source"] == "calibration" and info["clients"] == []
    assert info["calibration_samples"] == len(load_calibration_set(cfg))
    assert set(info["calibration_persons"]) == _persons(load_calibration_set(cfg))
    json.dumps(extra)  # goes into the checkpoint and summary as it is


def test_calibration_costs_no_epsilon_and_the_statement_says_it_is_not_protected() -> None:
    cfg = ExperimentConfig.from_run_config(FLAT)
    plain = ExperimentConfig.from_run_config(FLAT | {"data.standardize": "none", "data.calibration_sites": 0})
    assert stats_noise_multiplier(cfg) == 0.0 and stats_prior(cfg) == ()
    assert dp_sgd_noise(cfg, 100) == dp_sgd_noise(plain, 100)
    statement = privacy_statement(cfg)["standardization"]
    assert statement.startswith("calibration") and "not protected by any epsilon" in statement
    assert privacy_statement(plain)["standardization"] == "none"
    federated = ExperimentConfig.from_run_config(
        FLAT | {"data.standardize": "federated", "data.calibration_sites": 0}
    )
    assert "inside its epsilon" in privacy_statement(federated)["standardization"]


@pytest.mark.parametrize(
    ("overrides", "key", "hint"),
    [
        ({"data.calibration_sites": 0}, "data.calibration_sites", "at least 1"),
        ({"data.calibration_sites": -1}, "data.calibration_sites", ">= 0"),
        ({"data.standardize": "none"}, "data.calibration_sites", "data.standardize=calibration"),
        ({"data.standardize": "federated"}, "data.calibration_sites", "data.standardize=calibration"),
        ({"partition.scheme": "dirichlet"}, "partition.scheme", "partition.scheme=site"),
        ({"privacy.mode": "client"}, "data.standardize", "sample-level DP only"),
        ({"data.standardize": "mean"}, "data.standardize", "calibration"),
    ],
)
def test_bad_calibration_settings_fail_naming_the_key(overrides: dict, key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_run_config(FLAT | overrides)
    assert key in str(err.value) and hint in str(err.value)


@pytest.mark.e2e
def test_a_whole_run_standardises_with_the_calibration_set_and_trains_without_it(tmp_path) -> None:
    """``fedmer``'s own command, end to end (in process, no Ray): the run succeeds, no ledger holds
    a release, and the final model standardises with exactly the calibration set's statistics."""
    import torch

    from tests.e2e.conftest import run_cli

    overrides = ["data.standardize=calibration", "data.calibration_sites=1", "federation.runtime=inprocess"]
    proc = run_cli(tmp_path, *overrides, "model.encoder=functionals", "seed=3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["feature_stats"]["source"] == "calibration"
    assert "not protected by any epsilon" in summary["privacy"]["standardization"]
    cfg = ExperimentConfig.from_run_config(json.loads((tmp_path / "config.json").read_text())["run_config"])
    assert cfg.data.calibration_sites == 1
    expected = exact_feature_stats(load_calibration_set(cfg))
    assert read_feature_stats(tmp_path / FEATURE_STATS_JSON) == expected
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.testing.assert_close(state["standardizer.shift"], torch.tensor(expected.mean, dtype=torch.float32))
    for pid in range(cfg.federation.num_clients):  # DP-SGD's entries only: nothing released before round 1
        ledger = json.loads((tmp_path / "ledgers" / f"client-{pid}.json").read_text())["entries"]
        assert 0 not in ledger["round"]
