"""What a node knows about itself (its run config, partition, data and privacy state), and
how the server waits for nodes to connect.

The ClientApp's handlers start from :func:`node_of`; the statistics protocol and training both
reach the node's spend through :func:`node_privacy`, so there is one owner of it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from flwr.app import Context
from flwr.serverapp import Grid

from fedmer.config import ConfigError, ExperimentConfig
from fedmer.data.base import MultimodalDataset
from fedmer.data.registry import load_client_dataset
from fedmer.data.site_file import load_site_file
from fedmer.federation.faults import poisoned_labels
from fedmer.privacy.budget import NodePrivacy, ledger_path
from fedmer.results.layout import LEDGER_DIR, ledger_file, run_dir

__all__ = [
    "DATA_FILE_KEY",
    "SITE_KEY",
    "Node",
    "experiment_of",
    "node_data",
    "node_of",
    "node_privacy",
    "parse_run_config",
    "partition_of",
    "wait_for_nodes",
]

#: node_config key of a deployed site's own data file (see :mod:`fedmer.data.site_file`).
DATA_FILE_KEY = "data-file"
#: node_config key of the site's human-readable name (car-1, hospital-2): logs and its ledger.
SITE_KEY = "site"


@functools.lru_cache(maxsize=8)
def _experiment(items: tuple[tuple[str, object], ...]) -> ExperimentConfig:
    return ExperimentConfig.from_run_config(dict(items), complete=True)


def experiment_of(context: Context) -> ExperimentConfig:
    """The validated experiment config of this run (parsed once per process)."""
    return parse_run_config(context.run_config)


def parse_run_config(run_config: Mapping[str, object]) -> ExperimentConfig:
    """A run config (what Flower hands every node) as a validated experiment, cached per process."""
    return _experiment(tuple(sorted(run_config.items())))


def partition_of(context: Context, cfg: ExperimentConfig) -> int:
    """This node's partition id, checked against the federation size in the config."""
    node_config = context.node_config
    if "partition-id" not in node_config:
        raise ConfigError(
            "node_config has no 'partition-id': start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        )
    pid, n = (
        int(node_config["partition-id"]),
        int(node_config.get("num-partitions", cfg.federation.num_clients)),
    )
    if n != cfg.federation.num_clients:
        raise ConfigError(
            f"invalid num-partitions={n}: the run config has federation.num_clients="
            f"{cfg.federation.num_clients}; start {cfg.federation.num_clients} SuperNodes "
            "(simulation: --federation-config num-supernodes=N) or change federation.num_clients"
        )
    if not 0 <= pid < n:
        raise ConfigError(f"invalid partition-id={pid}: expected 0 <= partition_id < num-partitions={n}")
    return pid


@dataclass(frozen=True)
class Node:
    """One node in one run: its validated config, partition id and local training data."""

    cfg: ExperimentConfig
    pid: int
    data: MultimodalDataset


@functools.lru_cache(maxsize=4)
def _site_file(path: str) -> MultimodalDataset:
    return load_site_file(path)


def node_data(context: Context, cfg: ExperimentConfig, pid: int) -> MultimodalDataset:
    """A deployed site's own file (``data-file`` in its node config), else partition ``pid`` of the run."""
    if DATA_FILE_KEY in context.node_config:
        return _site_file(str(context.node_config[DATA_FILE_KEY]))
    data = load_client_dataset(cfg, pid)
    if cfg.faults.attack == "label_flip":  # a simulated attacker trains on poisoned labels
        y = poisoned_labels(cfg, pid, data.y, data.num_classes)
        if y is not data.y:
            data = replace(data, y=y)
    return data


def node_of(context: Context) -> Node:
    """Config, partition id and local data of this node (all cached per process)."""
    torch.set_num_threads(1)  # one Ray CPU per client: no oversubscription, reproducible sums
    cfg = experiment_of(context)
    pid = partition_of(context, cfg)
    return Node(cfg, pid, node_data(context, cfg, pid))


def node_privacy(context: Context, cfg: ExperimentConfig, pid: int) -> NodePrivacy:
    """The node's privacy state; its ledger is its own file, or ``<run folder>/ledgers/`` in simulation."""
    default = ledger_file(run_dir(cfg.output_dir, context.run_id) / LEDGER_DIR, pid)
    name = str(context.node_config[SITE_KEY]) if SITE_KEY in context.node_config else None
    return NodePrivacy(context, cfg, pid, ledger_path(context.node_config, default), name=name)


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    """Node ids once ``wanted`` nodes are connected, or those connected after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < wanted and time.monotonic() < deadline:
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    return nodes
