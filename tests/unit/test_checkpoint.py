"""The resume checkpoint: atomic, exact, and only ever continuing the same experiment."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedmer import records as rk
from fedmer.config import ExperimentConfig, FederationConfig, PrivacyConfig, StrategyConfig
from fedmer.federation.resume import (
    capture_rng,
    restore_rng,
    restore_strategy_state,
    strategy_state,
)
from fedmer.federation.strategies import build_strategy
from fedmer.privacy.budget import NodePrivacy
from fedmer.privacy.engine import PrivacyHistory, compute_epsilon
from fedmer.privacy.ledger import load_ledger, read_ledger
from fedmer.results import checkpoint as ck
from fedmer.results.checkpoint import (
    ContinuedRecorder,
    ResumeError,
    RoundCheckpoint,
    continue_rounds,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
)
from fedmer.results.recorder import RunRecorder
from tests.conftest import NodeListGrid

CFG = ExperimentConfig(strategy=StrategyConfig(name="fedadam"))


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages need the ids a running ServerApp would have set."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def _ckpt(cfg: ExperimentConfig = CFG, server_round: int = 3) -> RoundCheckpoint:
    return RoundCheckpoint(server_round, cfg.to_run_config(), 42, {"w": torch.arange(6.0).reshape(2, 3)})


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    strategy = build_strategy(CFG)
    adam = strategy.inner
    adam.m_t = {"w": np.full((2, 3), 0.25, np.float32)}  # type: ignore[attr-defined]
    adam.v_t = {"w": np.full((2, 3), 1e-3, np.float32)}  # type: ignore[attr-defined]
    adam.current_arrays = {"w": np.ones((2, 3), np.float32)}  # type: ignore[attr-defined]
    random.seed(5)
    ckpt = replace(
        _ckpt(), strategy=strategy_state(strategy), rng=capture_rng(), privacy={"epsilon_max": math.inf}
    )
    path = save_checkpoint(tmp_path, ckpt)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    back = load_checkpoint(tmp_path)  # torch.load(weights_only=True): plain values and tensors only
    assert back.server_round == 3 and back.run_id == 42 and back.run_config == CFG.to_run_config()
    assert torch.equal(back.model["w"], ckpt.model["w"]) and back.privacy == {"epsilon_max": math.inf}

    fresh = build_strategy(CFG)
    restore_strategy_state(fresh, back.strategy)
    for name in ("m_t", "v_t", "current_arrays"):
        saved, restored = getattr(adam, name), getattr(fresh.inner, name)
        assert restored["w"].dtype == np.float32 and np.array_equal(restored["w"], saved["w"]), name
    expected = [random.random() for _ in range(3)]
    random.seed(99)
    restore_rng(back.rng)
    assert [random.random() for _ in range(3)] == expected


def test_a_crash_while_writing_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, _ckpt(server_round=1))

    def dies_half_way(obj, fh):  # type: ignore[no-untyped-def]
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, _ckpt(server_round=2))
    assert load_checkpoint(tmp_path).server_round == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_corrupt_checkpoint_is_an_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ResumeError, match="checkpoint.pt: unreadable checkpoint"):
        load_checkpoint(tmp_path)


def test_client_level_accountant_and_offset_rounds_survive_a_resume() -> None:
    cfg = ExperimentConfig(privacy=PrivacyConfig(mode="client", client_noise_multiplier=1.5))
    strategy = build_strategy(cfg)
    strategy.round_offset = 4
    messages = list(
        strategy.configure_train(
            1, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord(), NodeListGrid(list(range(10)))
        )
    )
    assert {int(m.content[rk.CONFIG][rk.SERVER_ROUND]) for m in messages} == {5}  # the run's own round
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    dp = strategy.inner
    dp.accountant.compose(GaussianPrivacyEvent(1.5, 10, 10), count=3)  # type: ignore[attr-defined]
    fresh = build_strategy(cfg)
    restore_strategy_state(fresh, strategy_state(strategy))
    assert fresh.inner.privacy_spent().epsilon == pytest.approx(dp.privacy_spent().epsilon)  # type: ignore[attr-defined]


def _unfinished(tmp_path: Path, cfg: ExperimentConfig = CFG) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    save_checkpoint(folder, _ckpt(cfg, server_round=1))
    return folder


def test_resume_refuses_an_absent_a_finished_and_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ResumeError, match="no such run folder"):
        resumable_checkpoint(tmp_path / "nowhere", CFG)
    folder = _unfinished(tmp_path)
    (folder / "summary.json").write_text("{}")
    with pytest.raises(ResumeError, match="finished"):
        resumable_checkpoint(folder, CFG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResumeError, match="no checkpoint.pt"):
        resumable_checkpoint(tmp_path / "empty", CFG)


def test_resume_refuses_another_config_naming_every_changed_key(tmp_path: Path) -> None:
    folder = _unfinished(tmp_path)
    other = replace(CFG, seed=3, federation=FederationConfig(lr=0.05))
    with pytest.raises(ResumeError, match=r"Changed: federation\.lr: checkpoint 0\.1, this run 0\.05; seed"):
        resumable_checkpoint(folder, other)
    # where it is written and the resume request itself may differ
    same = replace(CFG, output_dir=str(folder), resume=str(folder))
    assert resumable_checkpoint(folder, same).server_round == 1


def test_rows_past_the_checkpoint_are_cut_and_none_repeated(tmp_path: Path) -> None:
    from fedmer.results.rounds import CSV_COLUMNS

    rec = RunRecorder(tmp_path, ExperimentConfig(privacy=PrivacyConfig(mode="off")))
    for r in range(3):
        row = {c: None for c in CSV_COLUMNS} | {"round": r, "uar": 0.1 * r, "epsilon_max": math.inf}
        rec.record(row, {"confusion": [[r]]})
    (tmp_path / "run.lock").write_text("999999999")  # the killed run's lock: taken over
    (tmp_path / ".checkpoint.pt.x1.tmp").write_bytes(b"cut short")
    rows = ContinuedRecorder(tmp_path, rec.cfg, last_round=1).rows
    assert not list(tmp_path.glob(".checkpoint.pt.*.tmp"))
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["epsilon_max"] == math.inf
    assert [json.loads(x)["round"] for x in (tmp_path / "rounds.jsonl").read_text().splitlines()] == [0, 1]
    assert [x.split(",")[0] for x in (tmp_path / "rounds.csv").read_text().splitlines()] == [
        "round",
        "0",
        "1",
    ]
    with pytest.raises(ResumeError, match="rounds \\[0, 1\\] recorded, but the checkpoint is at round 4"):
        continue_rounds(tmp_path, 4)


def test_a_resumed_node_accounts_the_runs_ledger_entries_once(tmp_path: Path) -> None:
    """Fresh Context.state, ledger charged by this run before: epsilon goes on from the ledger."""
    cfg = ExperimentConfig()
    ledger = tmp_path / "client-0.json"
    p = cfg.privacy
    led = load_ledger(ledger, node="client-0", accountant=p.accountant, delta=p.delta, cap=p.budget_cap)
    led = led.record([(1.0, 0.5, 2)], run_id="111", server_round=1)  # another run: not this one's spend
    led = led.record([(1.1, 0.5, 2)], run_id="7", server_round=1)
    led.record([(1.1, 0.5, 2)], run_id="7", server_round=2)  # charged, then the server was killed
    context = Context(run_id=999, node_id=1, node_config={}, state=RecordDict(), run_config={})
    node = NodePrivacy(context, cfg, 0, ledger, run_tag="7")
    assert node.history == PrivacyHistory()  # nothing in this process's state yet
    node.charge((1.1, 0.5, 2), server_round=2)  # the resumed run redoes round 2
    assert node.history.entries == ((1.1, 0.5, 2), (1.1, 0.5, 2))  # run 7's entries, once each
    node.commit(node.history.extended([(1.1, 0.5, 2)]))  # what training appends after the charge
    ours = [e for e in read_ledger(ledger).entries if e.run_id == "7"]
    assert [e.server_round for e in ours] == [1, 2, 2]  # the lost round stays charged: it was spent
    spent = compute_epsilon(PrivacyHistory(tuple((e.noise, e.rate, e.steps) for e in ours)), p.delta)
    assert node.epsilon() == pytest.approx(spent)


@pytest.mark.parametrize(("before", "now", "charged"), [("d", "d", False), ("d", "e", True), ("", "", True)])
def test_a_replay_of_the_same_release_is_not_charged_again(
    tmp_path: Path, before: str, now: str, charged: bool
) -> None:
    """Round 2 was charged, then the server was killed; the resumed run trains round 2 again.

    Same release digest (same seed, model, config, data): the same update, charged once. Another
    digest, or none (an OS-drawn seed), is a new release and is charged again.
    """
    cfg = ExperimentConfig()
    ledger = tmp_path / "client-0.json"
    p = cfg.privacy
    led = load_ledger(ledger, node="client-0", accountant=p.accountant, delta=p.delta, cap=p.budget_cap)
    led = led.record([(1.1, 0.5, 2)], run_id="7", server_round=1, release="a")
    led = led.record([(1.1, 0.5, 2)], run_id="7", server_round=2, release=before)
    context = Context(run_id=999, node_id=1, node_config={}, state=RecordDict(), run_config={})
    node = NodePrivacy(context, cfg, 0, ledger, run_tag="7")
    lifetime = node.charge((1.1, 0.5, 2), server_round=2, release=now)
    node.commit(node.history.extended([(1.1, 0.5, 2)]))  # what training appends after the charge
    rounds = [e.server_round for e in read_ledger(ledger).entries]
    assert rounds == ([1, 2, 2] if charged else [1, 2])
    assert node.history.steps == 2 * len(rounds)  # the run's accountant = its ledger
    assert node.epsilon() == pytest.approx(read_ledger(ledger).spent())
    assert lifetime == pytest.approx(read_ledger(ledger).spent())
    # a node that already trained in this process is not resuming: the same digest is charged
    led_now = read_ledger(ledger)
    node.charge((1.1, 0.5, 2), server_round=2, release=now)
    assert len(read_ledger(ledger).entries) == len(led_now.entries) + 1
