"""``fedmer run`` reaches Hydra's entry point through the ``fedmer.commands`` entry point.

The library's CLI never imports ``simulations``: the app registers ``run`` in pyproject.toml,
so an install that lacks it says so instead of failing on an import.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedmer import cli
from tests.conftest import ROOT


def _fedmer(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedmer.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_run_is_registered_by_the_app_not_imported_by_the_library() -> None:
    run = cli._plugin("run")
    assert run is not None and run.__module__ == "simulations.run"
    assert cli._plugin("nope") is None


@pytest.mark.slow
def test_fedmer_run_composes_hydra_and_rejects_a_bad_value_before_training() -> None:
    shown = _fedmer("run", "--cfg", "job", "privacy.recipe=auto")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "recipe: auto" in shown.stdout
    bad = _fedmer("run", "privacy.recipe=bogus")  # every bad input, in-process: test_bad_input.py
    assert (bad.returncode, bad.stdout) == (2, ""), bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "fedmer run: configuration error: invalid privacy.recipe='bogus': expected one of manual, auto"
    ]


def test_an_unknown_command_lists_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["nope"]) == 2
    assert "valid commands" in capsys.readouterr().err
