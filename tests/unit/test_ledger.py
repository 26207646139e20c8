"""The privacy ledger: spend accumulates across runs, survives crashes, and is never reset."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from fedmer.privacy.engine import PrivacyHistory, compute_epsilon
from fedmer.privacy.ledger import (
    SCHEMA_VERSION,
    BudgetExceeded,
    LedgerError,
    PrivacyLedger,
    history_increment,
    ledger_summary,
    load_ledger,
    read_ledger,
    show_ledger,
)

ROOT = Path(__file__).resolve().parents[2]
DELTA = 1e-5
ROUND = (1.1, 0.2, 5)  # (noise, rate, steps) of one local epoch


def _fresh(path: Path, cap: float | None = None, accountant: str = "rdp") -> PrivacyLedger:
    return load_ledger(path, node="vehicle-0", accountant=accountant, delta=DELTA, cap=cap)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedmer.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    led = _fresh(path, cap=8.0)
    assert not path.exists() and led.spent() == 0.0 and led.entries == ()
    led = led.record([ROUND, (1.3, 0.2, 2)], run_id=7, server_round=1)
    back = _fresh(path)
    assert back == led
    assert back.cap == 8.0 and back.entries[1].run_id == "7" and back.entries[1].server_round == 1
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == SCHEMA_VERSION
    assert raw["entries"] == {
        "noise": [1.1, 1.3], "rate": [0.2, 0.2], "steps": [5, 2], "run_id": ["7", "7"], "round": [1, 1],
        "release": ["", ""],
    }  # fmt: skip
    assert raw["spent_epsilon"] == pytest.approx(back.spent())


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_spend_accumulates_across_runs(tmp_path: Path, accountant: str) -> None:
    path = tmp_path / "ledger.json"
    led = _fresh(path, accountant=accountant)
    for rnd in (1, 2, 3):
        led = led.record([ROUND], run_id="run-a", server_round=rnd)
    after_run1 = _fresh(path, accountant=accountant).spent()
    led = _fresh(path, accountant=accountant)  # a new run: new process, same file
    for rnd in (1, 2):
        led = led.record([(0.9, 0.1, 10)], run_id="run-b", server_round=rnd)
    after_run2 = _fresh(path, accountant=accountant)
    assert after_run2.spent() > after_run1 > 0
    whole = PrivacyHistory((ROUND,) * 3 + ((0.9, 0.1, 10),) * 2)
    assert after_run2.spent() == pytest.approx(compute_epsilon(whole, DELTA, accountant), rel=1e-9)
    assert after_run2.history == PrivacyHistory(((1.1, 0.2, 15), (0.9, 0.1, 20)))  # grouped
    summary = ledger_summary(path)
    assert (summary["runs"], summary["rounds"], summary["total_steps"]) == (2, 5, 35)


def test_cap_is_enforced_exactly_at_the_boundary(tmp_path: Path) -> None:
    led = _fresh(tmp_path / "l.json").record([ROUND], run_id=1, server_round=1)
    after = led.would_exceed([ROUND])[1]
    assert after == pytest.approx(compute_epsilon(PrivacyHistory((ROUND, ROUND)), DELTA), rel=1e-9)
    for cap, exceeds in ((after, False), (math.nextafter(after, 0.0), True), (math.inf, False)):
        led = PrivacyLedger(led.path, led.node, led.accountant, led.delta, cap, led.entries)
        assert led.would_exceed([ROUND]) == (exceeds, after)
    with pytest.raises(BudgetExceeded) as info:
        PrivacyLedger(led.path, "vehicle-0", "rdp", DELTA, 0.5, led.entries).check_budget([ROUND])
    err = info.value
    assert (err.node, err.cap, err.spent) == ("vehicle-0", 0.5, pytest.approx(led.spent()))
    assert err.planned == pytest.approx(after)
    assert f"would reach epsilon {after:.4g}" in str(err) and "cap of 0.5" in str(err)


def test_cap_policy_and_uncapped_ledger(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ledger.json"
    _fresh(path).record([ROUND], run_id=1, server_round=1)
    assert json.loads(path.read_text())["cap"] == "inf"  # JSON has no infinity
    assert _fresh(path).cap == math.inf and "epsilon <= inf" in show_ledger(path)
    with caplog.at_level("WARNING", logger="fedmer.privacy.ledger"):
        led = _fresh(path, cap=4.0)
    assert led.cap == 4.0 and "changes from inf to 4" in caplog.text
    led.record([ROUND], run_id=1, server_round=2)
    assert _fresh(path).cap == 4.0  # the new cap is the node's policy from now on


def _edit(**changes: object) -> Callable[[str], str]:
    """A corruption: rewrite top-level fields or entry columns of a valid ledger file."""

    def apply(text: str) -> str:
        raw = json.loads(text)
        for key, value in changes.items():
            target = raw["entries"] if key in raw["entries"] else raw
            target[key] = value
        return json.dumps(raw)

    return apply


@pytest.mark.parametrize(
    ("corrupt", "why"),
    [
        (lambda text: "", "corrupt or truncated"),
        (lambda text: text[: len(text) // 2], "corrupt or truncated"),
        (lambda text: "[1, 2]", "not a FedMER privacy ledger"),
        (_edit(steps=[5]), "differ in length"),
        (_edit(schema_version=99), "schema_version 99"),
        (_edit(steps=[-3, 5]), "invalid entry"),
        (_edit(delta="1e-5"), "not a finite number"),
        (_edit(delta=2.0), "need 0 < delta < 1"),
        (_edit(accountant="moments"), "not one of rdp, prv"),
        (_edit(run_id=[1, 2]), "non-string run_id"),
    ],
)
def test_corrupt_file_is_an_error_naming_the_file(
    tmp_path: Path, corrupt: Callable[[str], str], why: str
) -> None:
    path = tmp_path / "ledger.json"
    _fresh(path).record([ROUND, ROUND], run_id=1, server_round=1)
    text = corrupt(path.read_text())
    path.write_text(text)
    with pytest.raises(LedgerError, match=why) as info:
        _fresh(path)
    assert str(path) in str(info.value)
    assert path.read_text() == text  # never reset


def test_mismatched_settings_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    _fresh(path).record([ROUND], run_id=1, server_round=1)
    with pytest.raises(LedgerError, match="accounted consistently"):
        load_ledger(path, node="vehicle-0", accountant="prv", delta=DELTA)
    with pytest.raises(LedgerError, match="delta=0.001"):
        load_ledger(path, node="vehicle-0", accountant="rdp", delta=1e-3)
    with pytest.raises(LedgerError, match="not one of rdp, prv"):
        load_ledger(tmp_path / "new.json", node="vehicle-0", accountant="gdp", delta=DELTA)
    with pytest.raises(LedgerError, match="belongs to node 'vehicle-0'"):
        load_ledger(path, node="vehicle-1", accountant="rdp", delta=DELTA)


def test_second_writer_with_a_stale_view_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    stale = _fresh(path)
    _fresh(path).record([ROUND], run_id=1, server_round=1)
    with pytest.raises(LedgerError, match="changed on disk"):
        stale.record([ROUND], run_id=1, server_round=2)
    assert len(read_ledger(path).entries) == 1


def test_crash_during_write_keeps_the_previous_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger.json"
    led = _fresh(path).record([ROUND], run_id=1, server_round=1)
    before = path.read_bytes()

    def crash(*_: object) -> None:
        raise OSError("simulated crash between temp write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        led.record([ROUND], run_id=1, server_round=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _fresh(path) == led
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock"]  # no temp left


def test_killed_process_mid_write_keeps_the_previous_ledger(tmp_path: Path) -> None:
    """A hard kill (no cleanup at all) after the temp file is written but before the rename."""
    path = tmp_path / "ledger.json"
    led = _fresh(path).record([ROUND], run_id=1, server_round=1)
    before = path.read_bytes()
    script = textwrap.dedent(
        f"""
        import os
        from fedmer.privacy.ledger import load_ledger
        led = load_ledger({str(path)!r}, node="vehicle-0", accountant="rdp", delta={DELTA!r})
        os.replace = lambda *a: os._exit(9)  # die like SIGKILL: no finally, no cleanup
        led.record([(1.1, 0.2, 5)], run_id=1, server_round=2)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=120, capture_output=True)
    assert proc.returncode == 9, proc.stderr
    assert path.read_bytes() == before
    assert _fresh(path) == led
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the orphan is harmless


def test_history_increment_undoes_opacus_merging() -> None:
    before = PrivacyHistory((ROUND,))
    assert history_increment(before, PrivacyHistory(((1.1, 0.2, 12),))) == ((1.1, 0.2, 7),)
    assert history_increment(before, before.extended([(2.0, 0.2, 3)])) == ((2.0, 0.2, 3),)
    assert history_increment(PrivacyHistory(), before) == (ROUND,)
    with pytest.raises(ValueError, match="does not extend"):
        history_increment(before, PrivacyHistory(((1.1, 0.2, 4),)))


@pytest.mark.slow
def test_show_and_cli(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    led = _fresh(path, cap=8.0).record([ROUND], run_id=3, server_round=1)
    eps = f"{led.spent():.4g}"
    text = show_ledger(path)
    assert f"epsilon = {eps} at delta = 1e-05" in text and "one sample of this node's data" in text
    proc = _cli("privacy", "show", str(path))
    assert proc.returncode == 0, proc.stderr
    assert f"epsilon = {eps} at delta = 1e-05" in proc.stdout and "rdp" in proc.stdout
    assert "1 training rounds in 1 runs, 5 accountant steps" in proc.stdout and "epsilon <= 8" in proc.stdout
    assert "0 outside training rounds" in proc.stdout
    other = tmp_path / "with-release.json"
    _fresh(other).record([(4.97, 1.0, 1)], run_id=4, server_round=0).record([ROUND], run_id=4, server_round=1)
    summary = ledger_summary(other)  # a statistics release before round 1 is not a training round
    assert (summary["rounds"], summary["entries_outside_rounds"], summary["total_steps"]) == (1, 1, 6)
    proc = _cli("privacy", "show", str(path), "--json")
    summary = json.loads(proc.stdout)
    assert summary["spent_epsilon"] == pytest.approx(led.spent()) and summary["accountant"] == "rdp"
    assert (summary["delta"], summary["cap"], summary["node"]) == (DELTA, 8.0, "vehicle-0")


@pytest.mark.slow
def test_cli_missing_or_corrupt_ledger_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    proc = _cli("privacy", "show", str(missing))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"fedmer privacy: {missing}: no privacy ledger at this path"
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    proc = _cli("privacy", "show", str(bad), "--json")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and str(bad) in proc.stderr


@pytest.mark.parametrize(
    ("tamper", "why"),
    [
        (lambda raw: raw["entries"].update({c: [] for c in raw["entries"]}), "truncated or edited"),
        (lambda raw: raw["entries"].update({c: v[:-1] for c, v in raw["entries"].items()}), "truncated"),
        (lambda raw: raw["entries"].update(noise=[v * 2 for v in raw["entries"]["noise"]]), "hash chain"),
        (lambda raw: raw["entries"].update(steps=raw["entries"]["steps"][::-1]), "hash chain"),
        (lambda raw: raw.update(created="2020-01-01T00:00:00+00:00"), "hash chain"),
    ],
)
def test_edited_or_truncated_history_is_refused_until_restored(
    tmp_path: Path, tamper: Callable[[dict], None], why: str
) -> None:
    """Emptying, cutting or editing the entries (even consistently across columns) is detected."""
    path = tmp_path / "ledger.json"
    _fresh(path).record([ROUND, (ROUND[0], ROUND[1], ROUND[2] + 1)], run_id=1, server_round=1)
    good = path.read_text()
    raw = json.loads(good)
    tamper(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(LedgerError, match=why) as info:
        _fresh(path)
    assert "refuses to train" in str(info.value)
    path.write_text(good)  # the operator restores the backup: the node works again
    assert len(_fresh(path).entries) == 2


def test_a_schema_1_ledger_is_read_and_gains_a_chain_on_its_next_write(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    _fresh(path).record([ROUND], run_id=1, server_round=1)
    raw = json.loads(path.read_text())
    raw["schema_version"] = 1
    del raw["chain"], raw["entry_count"]
    path.write_text(json.dumps(raw))
    _fresh(path).record([ROUND], run_id=2, server_round=1)
    upgraded = json.loads(path.read_text())
    assert upgraded["schema_version"] == SCHEMA_VERSION and upgraded["entry_count"] == 2


def test_a_schema_2_ledger_verifies_and_gains_the_release_column_on_its_next_write(tmp_path: Path) -> None:
    """Ledgers written before release digests keep their chain: "" entries hash as they did."""
    path = tmp_path / "ledger.json"
    _fresh(path).record([ROUND], run_id=1, server_round=1)
    raw = json.loads(path.read_text())
    raw["schema_version"] = 2
    del raw["entries"]["release"]
    path.write_text(json.dumps(raw))
    led = _fresh(path)
    assert led.entries[0].release == ""
    led.record([ROUND], run_id=1, server_round=2, release="abc")
    upgraded = json.loads(path.read_text())
    assert upgraded["schema_version"] == SCHEMA_VERSION == 3
    assert upgraded["entries"]["release"] == ["", "abc"]
    assert [e.release for e in _fresh(path).entries] == ["", "abc"]


def test_a_release_digest_is_in_the_chain_and_found_by_run_and_round(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    led = _fresh(path).record([ROUND], run_id="r", server_round=3, release="d1")
    assert led.releases("r", 3, "d1") == (0,)
    assert led.releases("r", 3, "d2") == led.releases("r", 2, "d1") == led.releases("q", 3, "d1") == ()
    assert led.releases("r", 3, "") == ()  # no digest: never the same release
    raw = json.loads(path.read_text())
    raw["entries"]["release"] = ["d2"]  # claiming another release for a charged round is an edit
    path.write_text(json.dumps(raw))
    with pytest.raises(LedgerError, match="hash chain"):
        _fresh(path)
