"""Every option in configs/ composes, validates, and drives one real client round.

For each group option, the composed config runs the real ClientApp train handler
(data, Opacus DP-SGD, update clipping) for two clients, the chosen Flower strategy
aggregates their replies, and the server-side evaluation scores the result. The Ray
runtime itself is exercised by the e2e tests; this keeps every config honest cheaply.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedmer import records as rk
from fedmer.data.registry import load_split
from fedmer.models import build_model_for
from fedmer.training.loops import evaluate_model
from simulations.run import experiment_from_hydra
from tests.conftest import CONFIGS, SHARED_DATA, NodeListGrid, compose

SMALL = ["data.persons_per_site=2", "data.sequences_per_person=12", "federation.num_rounds=2"]
OPTIONS = sorted(
    (group.name, path.stem)
    for group in CONFIGS.iterdir()
    if group.is_dir() and group.name != "experiment"
    for path in group.glob("*.yaml")
    if not path.stem.startswith("_")
)
#: Real datasets and their folder under ../shared/data (configs using them skip without it).
#: ravdess_dp reads eGeMAPS of all 1,440 clips: ~140 s to extract on a clean clone. Its smoke round
#: takes the 360 clips with a face instead, whose eGeMAPS cache the gain-robustness test shares.
SMOKE_EXTRA = {"ravdess_dp": ["data.complete_only=true"]}
REAL_DATA_FOLDERS = {"stress_predict": "stress-predict", "ravdess": "ravdess", "meld": "meld"}
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
#: Groups that only an experiment's defaults list holds (``fleet``: the frontier's fleet axis).
GROUP_EXPERIMENT = {"fleet": "frontier"}


def _group_overrides(group: str, option: str) -> list[str]:
    experiment = GROUP_EXPERIMENT.get(group)
    return [f"+experiment={experiment}", f"{group}={option}"] if experiment else [f"{group}={option}"]


def _data_mark(overrides: list[str]) -> list[pytest.MarkDecorator]:
    """``[data]`` when the composed config reads a real dataset (so ``-m "not data"`` leaves it out)."""
    name = experiment_from_hydra(compose(overrides)).data.name
    return [pytest.mark.data] if name in REAL_DATA_FOLDERS else []


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def _one_round(overrides: list[str], out: Path) -> None:
    """One round of three real ClientApp calls; ledgers under ``out`` (each test its own: two
    xdist workers writing one ledger would be, rightly, refused as a second writer)."""
    from client.app import train
    from fedmer.federation.strategies import build_strategy

    exp = experiment_from_hydra(compose([*SMALL, *overrides], output_dir=str(out)))
    folder = REAL_DATA_FOLDERS.get(exp.data.name)
    if folder is not None and not (SHARED_DATA / folder).is_dir():
        pytest.skip(f"../shared/data/{folder} not found: data.name={exp.data.name} needs the shared datasets")
    split = load_split(exp)
    model = build_model_for(exp, split.test)
    arrays = ArrayRecord(model.state_dict())
    flat = exp.to_run_config()
    n = exp.federation.num_clients
    strategy = build_strategy(exp)
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), NodeListGrid(list(range(1, n + 1)))))
    assert len(sent) == exp.federation.clients_per_round
    replies = []
    for pid in range(min(n, 3)):
        context = Context(
            run_id=1,
            node_id=pid + 1,
            node_config={"partition-id": pid, "num-partitions": n},
            state=RecordDict(),
            run_config=flat,
        )
        config = ConfigRecord(
            {
                **dict(sent[0].content[rk.CONFIG]),  # what the strategy adds (e.g. fedavg_modality's flag)
                rk.SERVER_ROUND: 1,
                rk.LR: exp.federation.lr,
                rk.LOCAL_EPOCHS: exp.federation.local_epochs,
            }
        )
        if exp.strategy.name == "fedprox":
            config[rk.PROXIMAL_MU] = exp.strategy.proximal_mu
        msg = Message(
            RecordDict({rk.ARRAYS: arrays, rk.CONFIG: config}),
            dst_node_id=pid + 1,
            message_type=MessageType.TRAIN,
        )
        reply = train(msg, context)
        metrics = reply.content[rk.METRICS]
        if exp.privacy.minimal_replies:  # no exact statistic of the node's data leaves it
            assert rk.TRAIN_LOSS not in metrics and rk.NUM_EXAMPLES not in metrics
            counts = {k for k in metrics if k.startswith(rk.MODALITY_COUNT_PREFIX)}
            assert set(metrics) - counts == rk.TRAIN_REPLY_METRICS_MINIMAL
        else:
            assert metrics[rk.UPDATE_NORM] >= 0 and math.isfinite(metrics[rk.TRAIN_LOSS])
        replies.append(reply)
    new_arrays, _ = strategy.inner.aggregate_train(1, replies)
    if new_arrays is not None:  # Bulyan/Krum need more replies than a smoke round has
        model.load_state_dict(new_arrays.to_torch_state_dict())
    report = evaluate_model(model, split.test)
    assert 0.0 <= report["uar"] <= 1.0


@pytest.mark.parametrize(
    ("group", "option"),
    [pytest.param(g, o, marks=_data_mark(_group_overrides(g, o)), id=f"{g}={o}") for g, o in OPTIONS],
)
def test_group_option_composes_and_runs_a_round(group: str, option: str, tmp_path: Path) -> None:
    overrides = _group_overrides(group, option)
    if group == "strategy" and option in ("krum", "multikrum", "bulyan", "fedtrimmedavg"):
        overrides.append("federation.num_clients=10")
    if group == "partition":  # label skew needs enough samples per class to fill 10 clients
        overrides.append("data.sequences_per_person=40")
    _one_round(overrides, tmp_path)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=_data_mark([f"+experiment={n}"])) for n in EXPERIMENTS]
)
def test_experiment_composes_and_runs_a_round(name: str, tmp_path: Path) -> None:
    _one_round([f"+experiment={name}", "data.sequences_per_person=40", *SMOKE_EXTRA.get(name, [])], tmp_path)
