"""`flwr run .` (Flower's own runtime: SuperLink, flwr-simulation) matches the Hydra path.

The test starts its own SuperLink in a private FLWR_HOME on free loopback ports, with
runtime dependency installation disabled (the app's dependencies are already in this
environment), runs the app with `flwr run . --stream`, stops the SuperLink, and compares
the per-round metrics with `python -m simulations.run` on the same config and seed: the e2e
session's ``quick_run`` (``federation=quick``, seed 7), whose keys :data:`KEYS` spells out.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

#: ``quick_run``'s config as run-config keys: what ``federation=quick`` changes from the default
#: federation (configs/federation/), the QUICK data overrides, and the seed.
KEYS = {
    "federation.num_clients": "3",
    "federation.num_rounds": "2",
    "federation.fraction_evaluate": "1.0",
    "federation.local_epochs": "1",
    "federation.batch_size": "32",
    "data.persons_per_site": "2",
    "data.sequences_per_person": "20",
    "seed": "7",
}
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def superlink(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A SuperLink of our own; yields the environment for `flwr` to reach it."""
    control, http, fleet = _free_ports(3)
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedmer-test"\n\n[superlink.fedmer-test]\n'
        f'address = "127.0.0.1:{http}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [
        str(BIN / "flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
        "--database",
        ":flwr-in-memory:",
        "--control-api-address",
        f"127.0.0.1:{control}",
        "--host",
        "127.0.0.1",
        "--port",
        str(http),
        "--fleet-api-address",
        f"127.0.0.1:{fleet}",
    ]
    log = open(tmp_path / "superlink.log", "w")  # noqa: SIM115 - closed in finally, after the process
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", http)) == 0:
                    break
            assert proc.poll() is None, (tmp_path / "superlink.log").read_text()[-3000:]
            time.sleep(0.5)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def test_flwr_run_and_hydra_give_the_same_metrics(
    superlink: dict[str, str], quick_run: Path, tmp_path: Path
) -> None:
    flwr_out = tmp_path / "flwr"
    run_config = " ".join(f"{k}={v}" for k, v in KEYS.items()) + f" output.dir='{flwr_out}'"
    proc = subprocess.run(
        [
            str(BIN / "flwr"),
            "run",
            ".",
            "fedmer-test",
            "--stream",
            "--federation-config",
            "num-supernodes=3 client-resources-num-cpus=1 client-resources-num-gpus=0",
            "--run-config",
            run_config,
        ],
        cwd=ROOT,
        env=superlink,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (flwr_out / "summary.json").exists(), proc.stdout[-6000:]

    # the Hydra path on the same config: the shared quick run (tests/e2e/conftest.py)
    hydra_config = json.loads((quick_run / "config.json").read_text())["run_config"]
    flwr_config = json.loads((flwr_out / "config.json").read_text())["run_config"]
    assert {k: v for k, v in flwr_config.items() if k != "output.dir"} == {
        k: v for k, v in hydra_config.items() if k != "output.dir"
    }

    keys = ("round", "uar", "accuracy", "macro_f1", "loss", "epsilon_max", "confusion", "client_epsilons")
    a, b = _rows(flwr_out), _rows(quick_run)
    assert len(a) == len(b) == 3
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]
    assert a[-1]["epsilon_max"] > a[1]["epsilon_max"] > 0
