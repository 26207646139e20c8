"""privacy.recipe=auto: what it chooses, that the choice meets the budget, and that the client uses it."""

from __future__ import annotations

import math
import tempfile

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmer import records as rk
from fedmer.config import ConfigError, ExperimentConfig, PrivacyConfig
from fedmer.data.registry import load_client_dataset
from fedmer.models import build_model
from fedmer.privacy.engine import PrivacyHistory, compute_epsilon, planned_steps
from fedmer.privacy.ledger import read_ledger
from fedmer.privacy.recipe import NOISE_PER_STEP_MAX, choose_recipe, recipe_grid
from fedmer.privacy.run_noise import dp_sgd_noise, local_recipe


def _choose(n: int, rounds: int = 30, eps: float = 8.0) -> object:
    return choose_recipe(
        n, num_rounds=rounds, target_epsilon=eps, delta=1e-5, accountant="rdp",
        max_grad_norm=1.0, lr=0.1, batch_size=128,
    )  # fmt: skip


def test_a_bad_recipe_name_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"privacy.recipe='fast': expected one of manual, auto"):
        PrivacyConfig(recipe="fast")


def test_manual_is_the_configured_recipe_and_noise() -> None:
    cfg = ExperimentConfig.from_run_config({"privacy.recipe": "manual"})
    r = local_recipe(cfg, 640)
    f = cfg.federation
    assert (r.batch_size, r.epochs, r.lr) == (f.batch_size, f.local_epochs, f.lr)
    assert r.noise_multiplier == dp_sgd_noise(cfg, 640)
    assert (r.sample_rate, r.steps_per_round * f.num_rounds) == planned_steps(640, 128, 2, 20)


def test_auto_is_the_default_under_dp_sgd() -> None:
    cfg = ExperimentConfig()
    assert cfg.privacy.sample_level and cfg.privacy.recipe == "auto"
    r = local_recipe(cfg, 640)
    assert r.why != "as configured (privacy.recipe=manual)" and r.noise_per_step <= NOISE_PER_STEP_MAX


def test_a_small_client_gets_full_batch_dp_gd() -> None:
    """45 clips (a RAVDESS client): no batch keeps the noise low, so the quietest: one full batch a round."""
    r = _choose(45)
    assert r.sample_rate == 1.0 and r.batch_size == 45 and r.steps_per_round == 1  # type: ignore[attr-defined]
    assert "quietest" in r.why  # type: ignore[attr-defined]


def test_epsilon_inf_is_the_same_recipe_without_noise() -> None:
    """The frontier's right end differs from a finite epsilon by the noise alone: the most steps."""
    r = _choose(240, rounds=8, eps=math.inf)
    assert r.noise_multiplier == 0.0 and r.noise_per_step == 0.0  # type: ignore[attr-defined]
    assert (r.batch_size, r.epochs) == (30, 2) and r.steps_per_round == 16  # type: ignore[attr-defined]
    assert r.why.startswith("epsilon = inf, no noise")  # type: ignore[attr-defined]
    cfg = ExperimentConfig.from_run_config({"privacy.target_epsilon": math.inf, "federation.num_rounds": 8})
    assert local_recipe(cfg, 240) == _choose(240, rounds=8, eps=math.inf) and dp_sgd_noise(cfg, 240) == 0.0


@pytest.mark.slow
@settings(max_examples=5, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=800),
    rounds=st.integers(min_value=1, max_value=40),
    eps=st.sampled_from([0.5, 1.0, 4.0, 8.0, 16.0]),
)
def test_the_choice_meets_the_target_and_is_the_best_that_fits(n: int, rounds: int, eps: float) -> None:
    r = _choose(n, rounds, eps)
    steps = r.steps_per_round * rounds  # type: ignore[attr-defined]
    spent = compute_epsilon(PrivacyHistory(((r.noise_multiplier, r.sample_rate, steps),)), 1e-5)  # type: ignore[attr-defined]
    assert spent <= eps * 1.01
    assert r.noise_per_step == pytest.approx(r.noise_multiplier / (r.sample_rate * n))  # type: ignore[attr-defined]
    if r.noise_per_step <= NOISE_PER_STEP_MAX:  # type: ignore[attr-defined]
        # nothing that fits takes more steps
        more = [(b, e) for b, e in recipe_grid(n, 128) if planned_steps(n, b, e, rounds)[1] > steps]
        for b, e in more[:1]:
            assert _choose_noise(n, b, e, rounds, eps) > NOISE_PER_STEP_MAX


def _choose_noise(n: int, batch: int, epochs: int, rounds: int, eps: float) -> float:
    from fedmer.privacy.engine import noise_for_target

    rate, steps = planned_steps(n, batch, epochs, rounds)
    return noise_for_target(eps, 1e-5, rate, steps, "rdp") / (rate * n)


def test_the_client_trains_with_the_recipe_and_the_ledger_records_it() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import train

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    out = tempfile.mkdtemp(prefix="fedmer-recipe-test-")
    flat = ExperimentConfig().to_run_config() | {
        "data.persons_per_site": 2, "data.sequences_per_person": 16, "federation.num_clients": 3,
        "privacy.recipe": "auto", "output.dir": out,
    }  # fmt: skip
    cfg = ExperimentConfig.from_run_config(flat)
    data = load_client_dataset(cfg, 0)
    recipe = local_recipe(cfg, len(data))
    torch.manual_seed(0)
    state = build_model(cfg.model, data.feature_slices, data.num_classes).state_dict()
    config = ConfigRecord({rk.SERVER_ROUND: 1, rk.LR: 0.1, rk.LOCAL_EPOCHS: 2})
    msg = Message(RecordDict({rk.ARRAYS: ArrayRecord(state), rk.CONFIG: config}), dst_node_id=1,
                  message_type=MessageType.TRAIN)  # fmt: skip
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config=flat)  # fmt: skip
    metrics = train(msg, context).content[rk.METRICS]
    assert metrics[rk.STEPS] == recipe.steps_per_round
    assert metrics[rk.NOISE_MULTIPLIER] == pytest.approx(recipe.noise_multiplier)
    ledger = read_ledger(f"{out}/ledgers/client-0.json")
    assert ledger.history.entries == ((recipe.noise_multiplier, recipe.sample_rate, recipe.steps_per_round),)
    assert math.isfinite(metrics[rk.EPSILON]) and metrics[rk.EPSILON] < cfg.privacy.target_epsilon
