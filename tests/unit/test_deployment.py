"""Deployment pieces without processes: keys, command lines, site files, the node-owned cap,
one node per partition, and silent nodes counted as failed."""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.config import parse_config_args

from fedmer import records as rk
from fedmer.config import ConfigError, ExperimentConfig
from fedmer.data.registry import load_client_dataset
from fedmer.data.site_file import SiteFileError, load_site_file, save_site_file
from fedmer.deployment.certificates import add_node_key, make_federation_keys
from fedmer.deployment.commands import SiteNode, format_node_config, supernode_command, write_connection
from fedmer.deployment.local import submitted_run_id
from fedmer.federation.grid import SharedPartitionError, _refuse_shared_partitions
from fedmer.models import build_model
from fedmer.privacy.budget import node_cap
from fedmer.privacy.ledger import BudgetExceeded, read_ledger

FLAT = ExperimentConfig().to_run_config() | {
    "data.persons_per_site": 2,
    "data.sequences_per_person": 16,
    "federation.num_clients": 3,
    "federation.batch_size": 16,
    "output.dir": tempfile.mkdtemp(prefix="fedmer-deploy-test-"),
}


# -- keys -------------------------------------------------------------------------------
def test_keys_chain_to_the_ca_name_loopback_and_are_what_flower_reads(tmp_path: Path) -> None:
    keys = make_federation_keys(tmp_path, ("fedmer.example.org", "10.1.2.3"), ("car-1", "hospital-1"))
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(keys.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the chain is wrong
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fedmer.example.org" in san.get_values_for_type(x509.DNSName)
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert {"10.1.2.3", "127.0.0.1"} <= ips  # the SuperLink's own SuperExec dials loopback
    for site in ("car-1", "hospital-1"):
        private = load_ssh_private_key(keys.node_key(site).read_bytes(), None)
        public = load_ssh_public_key(keys.node_public_key(site).read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(
            public, ec.EllipticCurvePublicKey
        )
        assert public.curve.name == "secp384r1"
        assert keys.node_key(site).stat().st_mode & 0o077 == 0  # private keys are not world-readable


def test_keys_refuse_to_overwrite_and_bad_names(tmp_path: Path) -> None:
    make_federation_keys(tmp_path, nodes=("car-1",))
    with pytest.raises(FileExistsError, match="already exists"):
        make_federation_keys(tmp_path, nodes=("car-1",))
    with pytest.raises(FileExistsError, match="car-1"):
        add_node_key(tmp_path, "car-1")
    with pytest.raises(ValueError, match="invalid node name"):
        add_node_key(tmp_path, "../etc")
    with pytest.raises(ValueError, match="unique"):
        make_federation_keys(tmp_path / "b", nodes=("a", "a"))


# -- command lines ----------------------------------------------------------------------
def test_node_config_is_parsed_by_flower_into_the_same_values(tmp_path: Path) -> None:
    node = SiteNode("hospital-2", 2, 3, tmp_path / "led ger.json", tmp_path / "d.npz", epsilon_cap=6.5)
    parsed = parse_config_args([format_node_config(node.node_config())])
    assert parsed == {
        "site": "hospital-2",
        "partition-id": 2,
        "num-partitions": 3,
        "ledger-path": str(tmp_path / "led ger.json"),
        "data-file": str(tmp_path / "d.npz"),
        "epsilon-cap": 6.5,
        "noise-seed": "os",
    }
    cmd = supernode_command(
        node, "10.0.0.5:8000", Path("ca.crt"), Path("nodes/hospital-2"), runtime_port=9100
    )
    assert cmd[cmd.index("--root-certificates") + 1] == "ca.crt" and "--insecure" not in cmd
    with pytest.raises(ValueError, match="partition_id=3"):
        SiteNode("x", 3, 3, tmp_path / "l.json")


def test_connection_file_is_read_by_flower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    write_connection(tmp_path, "other", "10.0.0.9:8000", tmp_path / "ca.crt")
    write_connection(tmp_path, "fedmer", "127.0.0.1:8123", tmp_path / "ca.crt")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    conn = read_superlink_connection("fedmer")
    assert conn.address == "127.0.0.1:8123" and conn.root_certificates == str((tmp_path / "ca.crt").resolve())
    assert read_superlink_connection("other").address == "10.0.0.9:8000"  # kept


def test_the_run_id_flwr_run_printed_is_found() -> None:
    assert submitted_run_id("x\nSuccessfully started run 123\n...\nSuccessfully started run 456\n") == 456
    assert submitted_run_id("no run here") is None


# -- site files -------------------------------------------------------------------------
def test_site_file_round_trip_and_clear_errors(tmp_path: Path) -> None:
    data = load_client_dataset(ExperimentConfig.from_run_config(FLAT), 1)
    path = save_site_file(data, tmp_path / "site.npz")
    back = load_site_file(path, data.modalities)
    assert np.array_equal(back.x, data.x) and np.array_equal(back.y, data.y)
    assert back.class_names == data.class_names and back.feature_slices == data.feature_slices
    with pytest.raises(SiteFileError, match="does not exist"):
        load_site_file(tmp_path / "absent.npz")
    with pytest.raises(SiteFileError, match="records modalities"):
        load_site_file(path, ("speech",))
    (tmp_path / "bad.npz").write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(SiteFileError, match="not a readable site file"):
        load_site_file(tmp_path / "bad.npz")
    x = data.x.copy()
    x[0, 0, 0] = np.nan
    from dataclasses import replace

    save_site_file(replace(data, x=x), tmp_path / "nan.npz")
    with pytest.raises(SiteFileError, match="non-finite"):
        load_site_file(tmp_path / "nan.npz")


# -- the node owns its cap --------------------------------------------------------------
@pytest.fixture
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def _train(node_config: dict, flat: dict, run_id: int) -> Message:
    from client.app import train

    cfg = ExperimentConfig.from_run_config(flat)
    data = load_client_dataset(cfg, 0)
    torch.manual_seed(0)
    state = build_model(cfg.model, data.feature_slices, data.num_classes).state_dict()
    config = ConfigRecord({rk.SERVER_ROUND: 1, rk.LR: 0.1, rk.LOCAL_EPOCHS: 1})
    msg = Message(RecordDict({rk.ARRAYS: ArrayRecord(state), rk.CONFIG: config}), dst_node_id=1,
                  message_type=MessageType.TRAIN)  # fmt: skip
    ctx = Context(
        run_id=run_id, node_id=1, node_config=node_config, state=RecordDict(), run_config=dict(flat)
    )
    return train(msg, ctx)


@pytest.mark.usefixtures("_task_identity")
def test_the_run_config_cannot_raise_a_node_cap_but_may_lower_it(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.json"
    base = {"partition-id": 0, "num-partitions": 3, "ledger-path": str(ledger), "site": "car-1"}
    first = _train(base | {"epsilon-cap": 100.0}, FLAT, run_id=11).content[rk.METRICS]
    spent = float(first[rk.EPSILON_LIFETIME])
    assert read_ledger(ledger).node == "car-1" and read_ledger(ledger).cap == 100.0
    # the node's operator caps it at what it spent; a run asking for a cap of 1000 changes nothing
    with pytest.raises(BudgetExceeded):
        _train(base | {"epsilon-cap": spent}, FLAT | {"privacy.budget_cap": 1000.0}, run_id=12)
    assert read_ledger(ledger).spent() == pytest.approx(spent)  # refusals spent nothing
    # without a node-config cap the cap stored in the node's ledger holds: a new ledger adopts
    # its first run's cap (here just above one round's spend), a later run cannot raise it
    other = base | {"ledger-path": str(tmp_path / "other.json")}
    _train(other, FLAT | {"privacy.budget_cap": spent * 1.001}, run_id=13)
    assert read_ledger(tmp_path / "other.json").cap == pytest.approx(spent * 1.001)
    with pytest.raises(BudgetExceeded):
        _train(other, FLAT | {"privacy.budget_cap": 1000.0}, run_id=15)
    # a run may lower the cap for itself
    with pytest.raises(BudgetExceeded):
        _train(base | {"epsilon-cap": 100.0}, FLAT | {"privacy.budget_cap": spent * 1.01}, run_id=14)
    assert read_ledger(ledger).cap == 100.0


def test_bad_node_caps_are_refused_naming_the_key() -> None:
    assert node_cap({}) is None and node_cap({"epsilon-cap": "inf"}) == math.inf
    for bad in ("lots", -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="epsilon-cap"):
            node_cap({"epsilon-cap": bad})


# -- one node per partition; deployment config keys -------------------------------------
def test_two_nodes_claiming_one_partition_stop_the_run() -> None:
    _refuse_shared_partitions({11: 0, 12: 1, 13: 2})
    with pytest.raises(SharedPartitionError, match=r"partition-id=0 claimed by nodes \[11, 13\]"):
        _refuse_shared_partitions({11: 0, 12: 1, 13: 0})


def test_min_available_and_round_timeout_are_validated() -> None:
    cfg = ExperimentConfig.from_run_config(FLAT | {"federation.min_available_clients": 2})
    assert cfg.federation.min_available_clients == 2
    for key, bad in (
        ("federation.min_available_clients", 4),
        ("federation.min_available_clients", -1),
        ("federation.round_timeout_s", 0.0),
        ("federation.round_timeout_s", float("inf")),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            ExperimentConfig.from_run_config(FLAT | {key: bad})


def test_simulation_attaches_to_a_ray_cluster_only_with_ray_address(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ray.init refuses num_cpus for an existing cluster: with RAY_ADDRESS only the address goes."""
    from flwr.supercore.constant import DEFAULT_SIMULATION_CONFIG

    from simulations.launch import backend_config

    cfg = ExperimentConfig.from_run_config(FLAT)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    own = backend_config(cfg)["init_args"]
    assert "num_cpus" in own and own["address"] == "local"  # never a stray `ray start` cluster
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    with caplog.at_level(logging.INFO, logger="simulations.launch"):
        local = backend_config(cfg)
        assert backend_config(cfg) == local  # the prestart and the runtime both ask: one message
    assert [r.getMessage() for r in caplog.records].count(
        "attaching the simulation to the Ray cluster at 10.0.0.7:6379 (RAY_ADDRESS)"
    ) == 1
    assert local["init_args"] == {
        "address": "10.0.0.7:6379",
        "include_dashboard": False,
        "logging_level": DEFAULT_SIMULATION_CONFIG.init_args_logging_level,  # what Flower sets by default
        "log_to_driver": DEFAULT_SIMULATION_CONFIG.init_args_log_to_driver,
    }
    assert local["client_resources"]["num_cpus"] == cfg.federation.client_cpus


def test_a_deployed_node_draws_its_noise_seed_from_the_os_not_the_run_seed() -> None:
    """The server picks the run seed: noise derived from it would protect nothing from the server."""
    from fedmer.federation.client_round import round_seed
    from fedmer.federation.node import Node

    cfg = ExperimentConfig.from_run_config(FLAT)
    node = Node(cfg, 1, load_client_dataset(cfg, 1))
    config = ConfigRecord({rk.SERVER_ROUND: 3})
    simulated = {round_seed(node, config, {"partition-id": 1}) for _ in range(3)}
    deployed = {round_seed(node, config, {"partition-id": 1, "noise-seed": "os"}) for _ in range(3)}
    assert len(simulated) == 1  # reproducible in simulation
    assert len(deployed) == 3 and not deployed & simulated
