"""What the start-up relies on: ``simulations.run`` imports nothing heavy before it starts Ray in
the background (simulations/ray_start.py), and the ClientApp that every Ray actor and every
deployed ``flwr-clientapp`` process imports does not pull in the SuperLink's state and grid."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def _modules_after(statement: str) -> set[str]:
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_the_run_command_imports_no_torch_opacus_flower_or_ray_before_it_starts_ray() -> None:
    loaded = _modules_after("import simulations.run")
    assert not {"torch", "opacus", "flwr", "ray"} & loaded


def test_the_client_app_does_not_import_the_superlinks_state_or_grid() -> None:
    """~0.7 s per process (its link state and object store), which only a ServerApp uses."""
    loaded = _modules_after("import client.app")
    assert "client.app" in loaded and "torch" in loaded
    assert not {"flwr.server.superlink.linkstate", "flwr.superlink.grid"} & loaded


def test_the_server_app_leaves_matplotlib_to_the_end_of_the_run() -> None:
    """matplotlib (~0.5 s of CPU) is for the learning curve drawn after the last round, not for
    the start-up, when the driver shares the cores with Ray's workers importing the ClientApp."""
    loaded = _modules_after("import server.app")
    assert "server.app" in loaded and "matplotlib" not in loaded
