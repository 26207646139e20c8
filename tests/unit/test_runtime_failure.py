"""Flower's "Ending simulation" error is renamed with its cause; every other error passes as it is.

The end-to-end behaviour (a runtime that fails to start exits 1 at once instead of hanging) is
pinned in ``tests/e2e/test_faults.py``.
"""

from __future__ import annotations

import threading

import pytest

from simulations import launch
from simulations.launch import _FLOWER_RUNTIME_FAILED, ABANDONED, _runtime_failure_named


@pytest.fixture(autouse=True)
def _clean_abandoned():
    ABANDONED.clear()
    yield
    ABANDONED.clear()


def test_flowers_runtime_failure_names_its_cause_and_records_the_stuck_thread() -> None:
    release = threading.Event()
    stuck = threading.Thread(target=release.wait, name="serverapp-like")
    stuck.start()
    try:
        expected = "^Flower's simulation runtime failed: ValueError: bad key$"
        with pytest.raises(RuntimeError, match=expected), _runtime_failure_named():
            raise RuntimeError(_FLOWER_RUNTIME_FAILED) from ValueError("bad key")
        assert stuck in launch.ABANDONED
    finally:
        release.set()
        stuck.join()


def test_any_other_runtime_error_passes_unchanged_and_abandons_nothing() -> None:
    message = "the run failed: 12 of 20 trainings failed"
    with pytest.raises(RuntimeError, match=f"^{message}$"), _runtime_failure_named():
        raise RuntimeError(message) from ValueError("inner")
    assert ABANDONED == []
