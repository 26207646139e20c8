"""Checkpoint and resume, end to end: SIGKILL mid-run then resume; Ctrl-C; no process left behind.

Every driver runs in its own session (``start_new_session``): Ray's GCS, raylet and workers
inherit it, so whatever a killed driver leaves is found by session id and killed by pid, on
failure too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from fedmer.privacy.engine import PrivacyHistory, compute_epsilon
from fedmer.privacy.ledger import LedgerError, read_ledger
from fedmer.results.checkpoint import load_checkpoint, resumable_checkpoint
from simulations.compose import compose_experiment
from tests.conftest import ROOT
from tests.e2e.conftest import QUICK, run_cli

pytestmark = pytest.mark.e2e

SEED = "seed=7"  # the seed of the shared quick_run
METRICS = ("round", "uar", "accuracy", "macro_f1", "loss", "confusion", "per_class_recall", "train_loss")


def _session(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, session, ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _kill_session(sid: int) -> None:
    for pid in _session(sid):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_gone(sid: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _session(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@contextmanager
def _driver(out: Path, *overrides: str) -> Iterator[subprocess.Popen]:
    """``python -m simulations.run`` in its own session; every process of it is killed on exit."""
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 - closed below
    cmd = [sys.executable, "-m", "simulations.run", *QUICK, *overrides, f"hydra.run.dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        _kill_session(proc.pid)
        log.close()


def _wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 400.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the awaited point"
        assert time.monotonic() < deadline, "the run did not get there in time"
        time.sleep(0.1)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def _rounds_recorded(out: Path) -> int:
    path = out / "rounds.csv"
    return len(path.read_text().splitlines()) - 1 if path.exists() else 0


def _run_entries(out: Path) -> dict[str, list[tuple[float, float, int, int, str]]]:
    """Each client's ledger entries (noise, rate, steps, round, release digest); one run per folder."""
    return {
        p.stem: [(e.noise, e.rate, e.steps, e.server_round, e.release) for e in read_ledger(p).entries]
        for p in sorted((out / "ledgers").glob("client-*.json"))
    }


def _charged(out: Path, server_round: int) -> bool:
    """Whether some client's ledger holds a charge for ``server_round``."""
    for path in (out / "ledgers").glob("client-*.json"):
        with suppress(LedgerError):  # written atomically; a read can still meet a missing file
            if any(e.server_round == server_round for e in read_ledger(path).entries):
                return True
    return False


def test_sigkill_mid_run_then_resume_ends_as_the_uninterrupted_run(quick_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with _driver(out, SEED) as proc:
        # killed mid round 2, once a node has charged it: the hard case for the accounting
        _wait_for(proc, lambda: _charged(out, 2))
        proc.send_signal(signal.SIGKILL)  # the driver only: its Ray processes are orphaned
        proc.wait(30)
    assert not (out / "summary.json").exists()
    killed_at = load_checkpoint(out).server_round
    assert killed_at == 1

    proc2 = run_cli(tmp_path / "resume", SEED, f"resume={out}")
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-6000:]

    # the same rounds, once each, with the same held-out metrics as the run never killed
    resumed, reference = _rows(out), _rows(quick_run)
    assert [r["round"] for r in resumed] == [0, 1, 2]
    for a, b in zip(resumed, reference, strict=True):
        assert {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["resumed_after_rounds"] == [killed_at]

    # privacy: nothing dropped, nothing charged twice. A node that charged the lost round and
    # trains it again on the same inputs (same seed, model, config, data: the same digest)
    # releases the same update: the replay is not a second charge, so the ledgers equal the
    # uninterrupted run's, entry for entry, digests included
    got, ref = _run_entries(out), _run_entries(quick_run)
    assert got.keys() == ref.keys() == {"client-0", "client-1", "client-2"}
    assert got == ref
    assert all(e[4] for entries in got.values() for e in entries), "a simulated round without its digest"
    # the epsilon the run reports is what its ledgers say was spent, the uninterrupted run's
    final = resumed[-1]
    for client, entries in got.items():
        spent = compute_epsilon(PrivacyHistory(tuple(e[:3] for e in entries)), 1e-5, "rdp")
        assert final["client_epsilons"][client.split("-")[1]] == pytest.approx(spent, rel=1e-6)
    assert final["epsilon_max"] == pytest.approx(reference[-1]["epsilon_max"], rel=1e-9)


def test_ctrl_c_while_ray_starts_its_actors_still_stops_with_130_and_no_process(tmp_path: Path) -> None:
    """Round 1 sampled, no client trained yet: Ray is starting the actors (once seen to hang)."""
    out = tmp_path / "run"
    log = out.with_suffix(".log")
    with _driver(out, SEED) as proc:
        _wait_for(proc, lambda: "configure_train: Sampled" in log.read_text())
        assert not _charged(out, 1), "a client trained already: not the start-up window"
        os.killpg(proc.pid, signal.SIGINT)
        started = time.monotonic()
        rc = proc.wait(30)
        took = time.monotonic() - started
        left = _wait_gone(proc.pid, timeout=15)
    text = log.read_text()
    assert rc == 130, text[-4000:]
    assert took < 15, f"took {took:.1f} s to stop"
    assert not left, f"processes left behind: {left}"
    assert "interrupted" in text


def test_ctrl_c_while_ray_starts_early_and_the_config_is_validated_stops_with_130_and_no_process(
    tmp_path: Path,
) -> None:
    """Before the run's own Ctrl-C handler: Ray is starting in the background (ray_start.py)."""
    out = tmp_path / "run"
    launched = time.time()
    with _driver(out, SEED) as proc:
        # Ray names its session folder after the process that starts it, as it starts (and an
        # older folder may carry the same PID: only one made since the launch counts)
        sessions = lambda: Path("/tmp/ray").glob(f"session_*_{proc.pid}")  # noqa: E731
        _wait_for(proc, lambda: any(s.stat().st_mtime >= launched for s in sessions()), timeout=60)
        assert "simulating" not in out.with_suffix(".log").read_text(), "the run started already"
        os.killpg(proc.pid, signal.SIGINT)
        started = time.monotonic()
        rc = proc.wait(30)
        took = time.monotonic() - started
        left = _wait_gone(proc.pid, timeout=15)
    assert rc == 130, out.with_suffix(".log").read_text()[-4000:]
    assert took < 15, f"took {took:.1f} s to stop"
    assert not left, f"processes left behind: {left}"


def test_ctrl_c_stops_within_seconds_leaves_a_checkpoint_and_no_process(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with _driver(out, SEED) as proc:
        # mid round 1, once a client trains (its ledger is charged): the round-0 checkpoint is
        # on disk and the Ray actors are up (the test above covers a Ctrl-C before that)
        _wait_for(proc, lambda: (out / "checkpoint.pt").exists() and _charged(out, 1))
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
        started = time.monotonic()
        rc = proc.wait(30)
        took = time.monotonic() - started
        left = _wait_gone(proc.pid, timeout=15)
    text = out.with_suffix(".log").read_text()
    assert rc == 130, text[-4000:]
    assert took < 15, f"took {took:.1f} s to stop"
    assert not left, f"processes left behind: {left}"
    assert f"to resume: fedmer run {' '.join(QUICK)} {SEED} resume={out}" in text
    exp = compose_experiment([*QUICK, SEED], output_dir=str(out))
    assert resumable_checkpoint(out, exp).server_round >= 0  # and the folder is resumable
