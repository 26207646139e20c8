"""Privacy bookkeeping is cached, not approximated: the same epsilon, noise and ledger, computed less often.

A client call used to recompute the same RDP epsilon three times and re-read and re-hash its
whole ledger twice. These tests pin that the caches return exactly (==, not approx) what
Opacus computes from scratch, that a ledger written once per round still verifies, and that a
change to the ledger file behind the process's back is seen and read again.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import create_accountant

import fedmer.privacy.ledger as ledger_module
from fedmer.privacy.engine import PrivacyHistory, compute_epsilon, noise_for_target
from fedmer.privacy.ledger import LedgerError, PrivacyLedger, load_ledger, read_ledger

DELTA = 1e-5
ROUND = (1.1, 0.2, 5)


def _opacus_epsilon(entries: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """What compute_epsilon computed before it was cached: a fresh Opacus accountant."""
    if all(e[0] == 0.0 for e in entries):
        return math.inf
    acc = create_accountant(mechanism=accountant)
    acc.history = list(entries)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


entry = st.tuples(
    st.sampled_from([0.0, 0.5, 1.0, 1.1, 2.002, 4.97]) | st.floats(0.3, 20.0),
    st.sampled_from([1.0, 0.2, 1 / 7, 0.5]) | st.floats(1e-4, 1.0),
    st.integers(1, 5000),
)


@settings(max_examples=20, deadline=None)  # each Opacus reference takes ~0.2-0.4 s
@given(entries=st.lists(entry, min_size=1, max_size=4), delta=st.sampled_from([1e-5, 1e-3, 0.05]))
def test_cached_rdp_epsilon_equals_opacus_bit_for_bit(
    entries: list[tuple[float, float, int]], delta: float
) -> None:
    history = PrivacyHistory(tuple(entries))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, again = compute_epsilon(history, delta), compute_epsilon(history, delta)
    expected = _opacus_epsilon(history.entries, delta, "rdp")
    assert first == again
    assert first == expected or (math.isnan(first) and math.isnan(expected))


@settings(max_examples=6, deadline=None)
@given(
    sigma=st.floats(0.5, 5.0), steps_per_round=st.integers(1, 40), rounds=st.integers(2, 5),
    rate=st.sampled_from([0.2, 1 / 3, 0.05]),
)  # fmt: skip
def test_epsilon_of_a_growing_history_round_by_round_equals_opacus(
    sigma: float, steps_per_round: int, rounds: int, rate: float
) -> None:
    """What a client asks every round: its repeated entry, a few steps longer (the incremental path)."""
    prior = (4.97, 1.0, 1)  # e.g. the statistics release, before DP-SGD
    for r in range(1, rounds + 1):
        entries = (prior, (sigma, rate, steps_per_round * r))
        assert compute_epsilon(PrivacyHistory(entries), DELTA) == _opacus_epsilon(entries, DELTA, "rdp")


def test_cached_prv_epsilon_equals_opacus() -> None:
    entries = ((1.1, 0.2, 40), (0.9, 0.1, 20))
    assert compute_epsilon(PrivacyHistory(entries), DELTA, "prv") == _opacus_epsilon(entries, DELTA, "prv")


def test_noise_for_a_planned_run_is_searched_once_and_unchanged() -> None:
    from fedmer.privacy import engine

    args = (8.0, DELTA, 0.2, 200, "rdp")
    prior = [(4.97, 1.0, 1)]  # a list: the cache must not care how the prior is passed
    fresh = engine._search(*args, tuple(prior))  # the search itself, no cache of any kind
    before = engine._noise_for_target.cache_info().hits
    assert noise_for_target(*args, prior=prior) == fresh
    assert noise_for_target(*args, prior=tuple(prior)) == fresh
    assert engine._noise_for_target.cache_info().hits >= before + 1
    plain = engine._search(*args, ())
    assert noise_for_target(*args) == plain < fresh


def _write_outside(path: Path, edit: object) -> None:
    """Another writer (not this process's ledger code) rewrites the file in place."""
    raw = json.loads(path.read_text())
    edit(raw)  # type: ignore[operator]
    with open(path, "r+", encoding="utf-8") as fh:  # in place: same inode
        fh.seek(0)
        fh.write(ledger_module._dumps(raw))
        fh.truncate()


def test_a_ledger_written_once_per_round_verifies_and_chains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger.json"
    writes: list[Path] = []
    real = ledger_module._atomic_write

    def counted(p: Path, payload: dict) -> None:  # the real write, counted
        writes.append(p)
        real(p, payload)

    monkeypatch.setattr(ledger_module, "_atomic_write", counted)
    led = load_ledger(path, node="n", accountant="rdp", delta=DELTA)
    for rnd in range(1, 8):
        led = load_ledger(path, node="n", accountant="rdp", delta=DELTA)  # as NodePrivacy.charge does
        led.check_budget([ROUND])
        led = led.record([ROUND], run_id="r", server_round=rnd)
    assert len(writes) == 7  # one write per round
    verified = ledger_module._read(path)  # no process cache: parse and check the whole chain
    assert verified == led and len(verified.entries) == 7
    raw = json.loads(path.read_text())
    assert raw["chain"] == ledger_module._chain("n", "rdp", DELTA, led.created, led.entries) == led.chain()
    assert raw["spent_epsilon"] == compute_epsilon(PrivacyHistory(((1.1, 0.2, 35),)), DELTA)


def test_the_chain_memo_is_used_only_for_its_own_prefix(tmp_path: Path) -> None:
    led = load_ledger(tmp_path / "l.json", node="n", accountant="rdp", delta=DELTA)
    for rnd in range(1, 4):
        led = led.record([ROUND], run_id="r", server_round=rnd)
    full = ledger_module._chain
    for other in (
        replace(led, entries=led.entries[:-1]),
        replace(led, entries=(led.entries[0]._replace(steps=6), *led.entries[1:])),
        replace(led, node="m"),
    ):
        assert other.chain() == full(other.node, "rdp", DELTA, other.created, other.entries) != led.chain()


def test_an_unchanged_ledger_is_not_read_again(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    load_ledger(path, node="n", accountant="rdp", delta=DELTA).record([ROUND], run_id="r", server_round=1)
    assert read_ledger(path) is read_ledger(path)


def test_a_ledger_changed_by_another_writer_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    led = load_ledger(path, node="n", accountant="rdp", delta=DELTA).record(
        [ROUND], run_id="r", server_round=1
    )
    assert read_ledger(path) == led

    # another process appends a round, keeping the chain valid
    def append(raw: dict) -> None:
        raw["entries"]["noise"].append(2.0)
        raw["entries"]["rate"].append(0.2)
        raw["entries"]["steps"].append(3)
        raw["entries"]["run_id"].append("other")
        raw["entries"]["round"].append(1)
        raw["entries"]["release"].append("")
        grown = (*led.entries, ledger_module.LedgerEntry(2.0, 0.2, 3, "other", 1))
        raw["entry_count"], raw["chain"] = 2, ledger_module._chain("n", "rdp", DELTA, led.created, grown)

    _write_outside(path, append)
    seen = load_ledger(path, node="n", accountant="rdp", delta=DELTA)
    assert len(seen.entries) == 2 and seen.entries[1].run_id == "other"
    with pytest.raises(LedgerError, match="changed on disk"):
        led.record([ROUND], run_id="r", server_round=2)  # the stale view may not overwrite it
    after = seen.record([ROUND], run_id="r", server_round=2)
    assert ledger_module._read(path) == after and len(after.entries) == 3


def test_an_edit_keeping_size_and_mtime_is_still_seen(tmp_path: Path) -> None:
    """Same size, same inode, mtime put back: the stamp's ctime and head (the chain) still differ."""
    path = tmp_path / "ledger.json"
    load_ledger(path, node="n", accountant="rdp", delta=DELTA).record([ROUND], run_id="r", server_round=1)
    assert isinstance(read_ledger(path), PrivacyLedger)
    st_before = os.stat(path)

    def flip_chain(raw: dict) -> None:
        raw["chain"] = raw["chain"][::-1]  # same length, no longer the entries' chain

    _write_outside(path, flip_chain)
    os.utime(path, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    st_after = os.stat(path)
    assert (st_after.st_size, st_after.st_mtime_ns, st_after.st_ino) == (
        st_before.st_size, st_before.st_mtime_ns, st_before.st_ino,
    )  # fmt: skip
    with pytest.raises(LedgerError, match="hash chain"):
        read_ledger(path)
