"""A secured federation of real Flower processes on loopback: TLS, node authentication, site files.

One SuperLink (TLS, ``--enable-supernode-auth``, a state database) and three SuperNodes, each
with its own key, data file, ledger and cap, started with the same command lines that
``fedmer deploy`` prints. The tests then check who may join, that a run writes the usual result
files, that ledgers stay on the nodes, that a node at its cap refuses across a restart, and that
a node killed with SIGKILL mid-run is counted as failed while the run goes on. Every process is
stopped by its process group when the module ends, also after a failure.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmer.config import ExperimentConfig
from fedmer.deployment.commands import BIN, SiteNode
from fedmer.deployment.local import COMPLETED, LocalFederation, free_port, submitted_run_id
from fedmer.deployment.site_data import write_site_files
from fedmer.privacy.ledger import read_ledger
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

SITES = ("car-1", "hospital-1", "hospital-2")
RUN = {
    "federation.num_clients": 3,
    "federation.num_rounds": 2,
    "federation.batch_size": 16,
    "federation.min_train_clients": 1,
    "data.persons_per_site": 2,
    "data.sequences_per_person": 20,
    "seed": 5,
}


def _node(fed: LocalFederation, i: int, cap: float | None = None) -> SiteNode:
    site = SITES[i]
    home = fed.root / "sites" / site
    ledger, data = home / "ledger.json", home / "data.npz"
    return SiteNode(site, i, len(SITES), ledger=ledger, data_file=data, epsilon_cap=cap)


def _wait_online(fed: LocalFederation, n: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ls = subprocess.run(
            [f"{BIN}/flwr", "supernode", "list", "fedmer-local", "--format", "json"],
            env=fed.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if ls.returncode == 0 and ls.stdout.count('"online"') >= n:
            return
        time.sleep(1.0)
    raise TimeoutError(f"fewer than {n} nodes online after {timeout:.0f} s:\n{ls.stdout[-2000:]}")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("federation")
    with LocalFederation(root, (*SITES, "intruder")) as fed:
        write_site_files(ExperimentConfig.from_run_config(dict(RUN)), SITES, root / "sites")
        fed.start_superlink()
        for site in SITES:
            done = fed.register(site)
            assert done.returncode == 0, done.stdout + done.stderr
        for i in range(len(SITES)):
            fed.start_supernode(_node(fed, i))
        _wait_online(fed, len(SITES))
        yield fed


def _summary(out: Path, fed: LocalFederation) -> dict:
    path = out / "summary.json"
    assert path.exists(), fed.log_tail("flwr-run", 6000)
    return json.loads(path.read_text())


def test_unregistered_node_is_refused(federation: LocalFederation) -> None:
    node = SiteNode("intruder", 0, len(SITES), ledger=federation.root / "intruder.json")
    federation.start_supernode(node, extra=("--max-retries", "1"))
    rc = federation.processes["intruder"].wait(timeout=120)
    assert rc != 0
    assert "Failed to activate SuperNode" in federation.log_tail("intruder", 20000)


def test_plaintext_node_is_refused_when_tls_is_on(federation: LocalFederation) -> None:
    cmd = [
        str(BIN / "flower-supernode"),
        "--superlink", federation.spec.address, "--insecure", "--max-retries", "1",
        "--auth-supernode-private-key", str(federation.keys.node_key("car-1")),
        "--port", str(free_port()), "--node-config", "partition-id=0 num-partitions=3",
    ]  # fmt: skip
    proc = federation.start("plaintext", cmd)
    assert proc.wait(timeout=120) != 0
    assert "SuperNode ID" not in federation.log_tail("plaintext", 20000)


def test_two_rounds_over_tls_write_results_and_keep_ledgers_on_the_nodes(federation: LocalFederation) -> None:
    out = federation.root / "run-1"
    rc = federation.run_app(ROOT, {**RUN, "output.dir": str(out)}, timeout=600)
    summary = _summary(out, federation)
    assert rc == 0 and summary["status"] == "ok", federation.log_tail("flwr-run", 6000)
    for name in ("config.json", "rounds.csv", "rounds.jsonl", "model.pt", "learning_curve.png"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    # no reply rejected: the server measured every update's norm at <= C (fedmer.federation.guard)
    assert all(r["clients_failed"] == 0 and r["clients_rejected"] == 0 for r in rows[1:])
    assert all(r["clients_replied"] == r["clients_sampled"] == len(SITES) for r in rows[1:])
    assert not (out / "ledgers").exists()  # the server wrote no ledger: each lives on its node
    for site in SITES:
        ledger = read_ledger(federation.root / "sites" / site / "ledger.json")
        assert ledger.node == site and len(ledger.entries) == 2
        assert 0 < ledger.spent() <= 8.0 + 1e-6


def test_node_at_its_cap_refuses_after_restart_and_a_killed_node_is_counted(
    federation: LocalFederation,
) -> None:
    car = federation.root / "sites" / "car-1" / "ledger.json"
    spent = read_ledger(car).spent()
    # car-1's operator caps it at what it has spent; the server's run config cannot raise it
    federation.stop("car-1")
    federation.start_supernode(_node(federation, 0, cap=spent))
    _wait_online(federation, len(SITES))

    out = federation.root / "run-2"
    config = {
        **RUN,
        "output.dir": str(out),
        "federation.min_available_clients": 1,
        "federation.round_timeout_s": 60.0,
        "privacy.budget_cap": 1000.0,
    }
    proc = federation.submit(ROOT, config)
    rows = out / "rounds.jsonl"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and (not rows.exists() or len(rows.read_text().splitlines()) < 2):
        assert proc.poll() is None, federation.log_tail("flwr-run", 6000)
        time.sleep(0.5)
    before = len(read_ledger(federation.root / "sites" / "hospital-2" / "ledger.json").entries)
    federation.stop("hospital-2", sig=signal.SIGKILL)  # the node dies mid-run
    assert proc.wait(timeout=400) == 0
    status = federation.run_status(submitted_run_id(federation.log_tail("flwr-run", 10**7)))
    summary = _summary(out, federation)
    assert status == COMPLETED and summary["status"] == "ok", federation.log_tail("flwr-run", 6000)
    assert summary["clients_refused_total"] >= 1  # car-1, at its own cap
    assert summary["clients_failed_total"] >= 1  # hospital-2, killed
    assert read_ledger(car).spent() == pytest.approx(spent)  # a refusal spends nothing
    for row in map(json.loads, rows.read_text().splitlines()[1:]):  # each sampled node counted once
        counted = sum(row[f"clients_{k}"] for k in ("replied", "failed", "refused", "rejected"))
        assert counted == row["clients_sampled"], row

    # the killed node rejoins with its ledger intact (the spend it was charged is still there)
    federation.start_supernode(_node(federation, 2))
    _wait_online(federation, len(SITES))
    assert len(read_ledger(federation.root / "sites" / "hospital-2" / "ledger.json").entries) >= before
