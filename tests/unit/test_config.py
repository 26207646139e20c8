"""Config: one set of defaults in three places, and bad input stopped with a clear message."""

from __future__ import annotations

import math
import re

import pytest
import tomllib

from fedmer.config import AUTO, ConfigError, ExperimentConfig, PrivacyConfig
from tests.conftest import ROOT, compose


def _pyproject_run_config() -> dict:
    from flwr.common.config import flatten_dict

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return flatten_dict(data["tool"]["flwr"]["app"]["config"])


def test_pyproject_declares_exactly_the_dataclass_defaults() -> None:
    assert _pyproject_run_config() == ExperimentConfig().to_run_config()


def test_hydra_defaults_equal_dataclass_defaults() -> None:
    from simulations.run import experiment_from_hydra

    assert experiment_from_hydra(compose()) == ExperimentConfig()


def test_run_config_round_trip() -> None:
    exp = ExperimentConfig()
    flat = exp.to_run_config()
    assert flat["privacy.noise_multiplier"] == AUTO
    assert ExperimentConfig.from_run_config(flat) == exp
    flat["privacy.noise_multiplier"] = 1.3
    assert ExperimentConfig.from_run_config(flat).privacy.noise_multiplier == 1.3


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("strategy.name", "fedsgd", "fedavg"),
        ("data.name", "imagenet", "synthetic"),
        ("privacy.target_epsilon", 0.0, "> 0"),
        ("privacy.target_epsilon", -1.0, "> 0"),
        ("privacy.target_epsilon", 1e-9, ">= 0.01"),
        ("privacy.delta", 0.0, "(0, 1)"),
        ("privacy.delta", 1.0, "(0, 1)"),
        ("privacy.accountant", "moments", "rdp"),
        ("model.fusion", "magic", "attention"),
        ("partition.scheme", "random", "dirichlet"),
        ("federation.fraction_train", 1.5, "(0, 1]"),
        ("federation.num_clients", 0, "> 0"),
        ("data.modalities", "speech,smell", "speech"),
        ("data.standardize", "zscore", "none, federated"),
        ("data.complete_only", True, "only RAVDESS"),
        ("privacy.stats_epsilon_fraction", 1.0, "(0, 1)"),
        ("privacy.stats_clip_norm", 0.0, "> 0"),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(
    key: str, value: object, expected: str
) -> None:
    flat = ExperimentConfig().to_run_config()
    flat[key] = value
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_run_config(flat)
    msg = str(err.value)
    assert key in msg and repr(value) in msg and expected in msg


def test_unknown_key_is_an_error_listing_valid_keys() -> None:
    flat = ExperimentConfig().to_run_config() | {"privacy.epsilon": 3.0}
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) privacy.epsilon.*privacy.target_epsilon"):
        ExperimentConfig.from_run_config(flat)


def test_fewer_clients_than_strategy_minimum() -> None:
    flat = ExperimentConfig().to_run_config() | {"federation.num_clients": 1}
    with pytest.raises(ConfigError, match="federation.min_train_clients=2"):
        ExperimentConfig.from_run_config(flat)
    flat = ExperimentConfig().to_run_config() | {"strategy.name": "bulyan", "strategy.num_malicious": 2}
    with pytest.raises(ConfigError, match=r"needs at least 11 clients per round.*samples 10"):
        ExperimentConfig.from_run_config(flat)


def test_federated_standardisation_is_refused_with_client_level_dp() -> None:
    flat = ExperimentConfig().to_run_config() | {"data.standardize": "federated", "privacy.mode": "client"}
    with pytest.raises(ConfigError, match=r"data.standardize='federated'.*use data.standardize=none"):
        ExperimentConfig.from_run_config(flat)


def test_infinite_target_means_dp_sgd_clipping_without_noise() -> None:
    from fedmer.privacy.run_noise import dp_sgd_noise as _noise_multiplier

    cfg = ExperimentConfig(privacy=PrivacyConfig(target_epsilon=math.inf))
    assert _noise_multiplier(cfg, 640) == 0.0
    assert _noise_multiplier(ExperimentConfig(), 640) > 0.5  # the finite default does add noise


def test_hydra_override_reaches_the_experiment() -> None:
    from simulations.run import experiment_from_hydra

    exp = experiment_from_hydra(
        compose(["strategy=fedprox", "privacy.target_epsilon=4", "federation.num_clients=50"])
    )
    assert (exp.strategy.name, exp.privacy.target_epsilon, exp.federation.num_clients) == ("fedprox", 4.0, 50)


@pytest.mark.parametrize(
    "key",
    [
        "privacy.update_clip_norm",
        "privacy.max_grad_norm",
        "privacy.stats_clip_norm",
        "privacy.noise_multiplier",
        "strategy.server_lr",
        "strategy.tau",
        "strategy.proximal_mu",
        "federation.lr",
        "model.aux_weight",
        "partition.alpha",
    ],
)
def test_infinite_values_that_can_only_make_training_non_finite_are_refused(key: str) -> None:
    """e.g. privacy.update_clip_norm=inf used to pass and save an all-NaN model.pt with rc 0."""
    flat = ExperimentConfig().to_run_config() | {key: math.inf}
    with pytest.raises(ConfigError, match=rf"invalid {re.escape(key)}=inf: expected .*finite"):
        ExperimentConfig.from_run_config(flat)


def test_an_infinite_budget_cap_still_means_no_cap() -> None:
    flat = ExperimentConfig().to_run_config() | {"privacy.budget_cap": math.inf}
    assert math.isinf(ExperimentConfig.from_run_config(flat).privacy.budget_cap)
