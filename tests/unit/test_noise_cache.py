"""The noise searches' disk cache returns what the search returns, and never trusts a bad entry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmer.privacy import engine
from fedmer.privacy.noise_cache import NOISE_CACHE_ENV, cached_noise, cached_on_disk
from tests.conftest import ROOT

KEY = {"target_epsilon": 8.0, "delta": 1e-5, "sample_rate": 0.25, "steps": 40, "accountant": "rdp"}
KEY["prior"] = ()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDMER_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(NOISE_CACHE_ENV, raising=False)
    return tmp_path / "noise"


class Counting:
    def __init__(self, value: float) -> None:
        self.value, self.calls = value, 0

    def __call__(self) -> float:
        self.calls += 1
        return self.value


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json"))


def test_a_second_ask_reads_the_stored_answer(_own_cache: Path) -> None:
    search = Counting(1.2345678901234567)
    assert cached_noise(KEY, search) == search.value
    assert cached_noise(dict(KEY), search) == search.value  # bit for bit, from disk
    assert search.calls == 1
    (entry,) = _entries(_own_cache)
    assert json.loads(entry.read_text())["key"]["steps"] == 40


def test_another_key_is_another_entry(_own_cache: Path) -> None:
    a, b = Counting(1.0), Counting(2.0)
    assert cached_noise(KEY, a) == 1.0
    assert cached_noise({**KEY, "steps": 41}, b) == 2.0
    assert cached_noise({**KEY, "prior": ((4.97, 1.0, 1),)}, b) == 2.0
    assert (a.calls, b.calls) == (1, 2) and len(_entries(_own_cache)) == 3


@pytest.mark.parametrize(
    "stored",
    ['{"key": ', "[1.5]", '{"key": {}, "noise": 1.5}', "nan-key", '{"noise": -1.0}', '{"noise": "1.5"}'],
    ids=["torn", "not-an-object", "foreign-key", "wrong-key-same-file", "negative", "a-string"],
)
def test_a_bad_entry_is_searched_again_and_replaced(_own_cache: Path, stored: str) -> None:
    search = Counting(0.9)
    cached_noise(KEY, search)
    (entry,) = _entries(_own_cache)
    if stored == "nan-key":  # the right file holding another key's answer
        raw = json.loads(entry.read_text())
        raw["key"]["steps"] = 1
        stored = json.dumps(raw)
    elif stored.startswith('{"noise"'):  # the right key with an impossible answer
        raw = json.loads(entry.read_text())
        raw["noise"] = json.loads(stored)["noise"]
        stored = json.dumps(raw)
    entry.write_text(stored)
    assert cached_noise(KEY, search) == 0.9
    assert search.calls == 2
    assert json.loads(entry.read_text())["noise"] == 0.9  # rewritten whole


def test_switched_off_it_searches_every_time(_own_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NOISE_CACHE_ENV, "0")
    search = Counting(1.0)
    cached_noise(KEY, search)
    cached_noise(KEY, search)
    assert search.calls == 2 and not _own_cache.exists()


def test_an_unwritable_cache_still_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FEDMER_CACHE_DIR", str(blocker))  # a file where the folder should be
    assert cached_noise(KEY, Counting(1.5)) == 1.5


def test_another_process_gets_the_searched_noise_from_disk(_own_cache: Path) -> None:
    """The real search (Opacus' RDP accountant) in a child process, then read back here."""
    args = (8.0, 1e-5, 1.0, 30, "rdp")  # full batch: Opacus' closed form, a quick search
    code = f"from fedmer.privacy.engine import noise_for_target;print(repr(noise_for_target(*{args!r})))"
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    searched = float(child.stdout.strip())
    assert searched == engine._search(*args, ())  # what the search gives, no cache involved
    (entry,) = _entries(_own_cache)
    assert json.loads(entry.read_text())["key"]["search"] == engine._SEARCH
    engine._noise_for_target.cache_clear()  # this process has not searched it itself
    assert engine.noise_for_target(*args) == searched


def test_a_changed_search_method_does_not_read_the_old_answers(_own_cache: Path) -> None:
    counting = Counting(1.0)

    def search(target_epsilon: float, steps: int = 3) -> float:
        return counting()

    old, new = cached_on_disk("method A")(search), cached_on_disk("method B")(search)
    old(8.0)
    old(8.0, 3)  # the same arguments, the default written out
    new(8.0)
    assert counting.calls == 2 and len(_entries(_own_cache)) == 2
