"""The command lines of a secured federation, built in one place (Flower 1.42 flags).

Every flag here was checked against the installed flwr 1.42 wheel; upstream how-to pages still
show flags that 1.42 refuses (separate 9091-9093 ports, ``--auth-list-public-keys``). The
``fedmer deploy`` commands print or run exactly these lines, and the end-to-end tests start
their federation with them, so what is documented is what is tested.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fedmer.deployment.certificates import FederationKeys

if TYPE_CHECKING:
    from fedmer.config import ExperimentConfig

__all__ = [
    "BIN",
    "SiteNode",
    "SuperLinkSpec",
    "checked_run_config",
    "flower_env",
    "flwr_run_command",
    "format_node_config",
    "register_command",
    "run_config_text",
    "superlink_command",
    "supernode_command",
    "write_connection",
]

#: Where this environment's Flower executables live (``flower-superexec`` must be on PATH).
BIN = Path(sys.executable).parent


def _exe(name: str) -> str:
    local = BIN / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def flower_env(flwr_home: Path | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment Flower's processes need: BIN on PATH, no runtime dependency installs.

    A SuperLink otherwise runs ``uv sync`` for every submitted app: a hospital node must run
    only what its operators installed, and a machine without internet would hang on it.
    """
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


@dataclass(frozen=True)
class SuperLinkSpec:
    """One SuperLink: TLS from ``keys``, node authentication, registrations kept in ``database``."""

    keys: FederationKeys
    database: Path
    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"invalid port={self.port}: expected 1..65535")

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"{host}:{self.port}"


def superlink_command(spec: SuperLinkSpec) -> list[str]:
    """``flower-superlink`` with TLS, node authentication and a state database, one port."""
    return [
        _exe("flower-superlink"),
        "--ssl-ca-certfile", str(spec.keys.ca_cert),
        "--ssl-certfile", str(spec.keys.server_cert),
        "--ssl-keyfile", str(spec.keys.server_key),
        "--enable-supernode-auth",
        "--database", str(spec.database),
        "--disable-runtime-dependency-installation",
        "--host", spec.host,
        "--port", str(spec.port),
    ]  # fmt: skip


@dataclass(frozen=True)
class SiteNode:
    """One deployed site (a car or a hospital ward): who it is, its data, its ledger and its cap.

    ``data_file`` is the site's own data (``fedmer deploy site-data`` writes demo files); without
    it the node trains on partition ``partition_id`` of the run's dataset (a shared-copy pilot).
    """

    site: str
    partition_id: int
    num_partitions: int
    ledger: Path
    data_file: Path | None = None
    epsilon_cap: float | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.partition_id < self.num_partitions:
            raise ValueError(
                f"invalid partition_id={self.partition_id}: expected 0..{self.num_partitions - 1} "
                f"(num_partitions={self.num_partitions})"
            )
        if self.epsilon_cap is not None and not self.epsilon_cap >= 0:
            raise ValueError(f"invalid epsilon_cap={self.epsilon_cap}: expected a number >= 0 or inf")

    def node_config(self) -> dict[str, str | int | float]:
        """The node config every handler of the ClientApp reads (keys in ``fedmer.federation.node``)."""
        cfg: dict[str, str | int | float] = {
            "site": self.site,
            "partition-id": self.partition_id,
            "num-partitions": self.num_partitions,
            "ledger-path": str(self.ledger),
            "noise-seed": "os",  # DP noise the server cannot regenerate from the run seed
        }
        if self.data_file is not None:
            cfg["data-file"] = str(self.data_file)
        if self.epsilon_cap is not None:
            cfg["epsilon-cap"] = "inf" if math.isinf(self.epsilon_cap) else float(self.epsilon_cap)
        cfg.update(self.extra)
        return cfg


def format_node_config(config: Mapping[str, str | int | float]) -> str:
    """Flower's ``--node-config`` syntax: strings quoted, numbers bare (else Flower refuses them)."""
    parts = []
    for key, value in config.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{key}={value}")
        else:
            text = str(value)
            if '"' in text:
                raise ValueError(f"node config value {key}={text!r} may not contain a double quote")
            parts.append(f'{key}="{text}"')
    return " ".join(parts)


def supernode_command(
    node: SiteNode, superlink: str, ca_cert: Path, private_key: Path, runtime_port: int = 9094
) -> list[str]:
    """``flower-supernode`` over TLS, authenticated by the node's own key.

    ``runtime_port`` is the node's local ClientApp API; nodes sharing one host need distinct ones.
    """
    return [
        _exe("flower-supernode"),
        "--superlink", superlink,
        "--root-certificates", str(ca_cert),
        "--auth-supernode-private-key", str(private_key),
        "--port", str(runtime_port),
        "--node-config", format_node_config(node.node_config()),
    ]  # fmt: skip


def register_command(public_key: Path, connection: str, name: str | None = None) -> list[str]:
    """``flwr supernode register``: admit a node's public key to the federation."""
    cmd = [_exe("flwr"), "supernode", "register", str(public_key), connection]
    return cmd + (["--name", name] if name else [])


def flwr_run_command(app_dir: Path, connection: str, run_config: Mapping[str, object]) -> list[str]:
    """``flwr run`` of the FedMER app against a named SuperLink connection, streaming its logs."""
    text = run_config_text(run_config)
    cmd = [_exe("flwr"), "run", str(app_dir), connection, "--stream"]
    return cmd + (["--run-config", text] if text else [])


def run_config_text(run_config: Mapping[str, object]) -> str:
    """The ``--run-config`` argument for ``run_config``: space-separated TOML ``key=value`` pairs."""
    return " ".join(f"{k}={_toml_value(k, v)}" for k, v in run_config.items())


def checked_run_config(app_dir: Path, run_config: Mapping[str, object]) -> ExperimentConfig:
    """The experiment a ``flwr run`` with ``run_config`` would start, validated before it is sent.

    Done with Flower's own functions, in Flower's order: ``flwr run`` parses the
    ``--run-config`` text (:func:`run_config_text`) with ``parse_config_args``; the SuperLink
    refuses keys the app's pyproject.toml does not declare and fuses the rest into its
    ``[tool.flwr.app.config]`` defaults (``get_fused_config_from_dir``); the ServerApp then
    builds its config (``server/app.py`` ``main``). Raises :class:`~fedmer.errors.ConfigError`
    naming the key, the value and what is valid. This must happen here: ``flwr run`` (1.42)
    exits 0 when the ServerApp fails, after printing the ServerApp's traceback.
    """
    import click
    from flwr.common.config import (
        flatten_dict,
        get_fused_config_from_dir,
        get_project_config,
        parse_config_args,
    )

    from fedmer.config import ConfigError, ExperimentConfig, unknown_keys_error

    text = run_config_text(run_config)
    try:
        overrides = parse_config_args([text]) if text else {}
    except click.ClickException as err:
        raise ConfigError(f"invalid --run-config {text!r}: {err.message}") from None
    declared = flatten_dict(get_project_config(app_dir)["tool"]["flwr"]["app"].get("config", {}))
    if set(overrides) - set(declared):
        raise unknown_keys_error(overrides, declared)
    fused = get_fused_config_from_dir(app_dir, overrides)
    return ExperimentConfig.from_run_config(fused, complete=True)


def _toml_value(key: str, value: object) -> str:
    """One TOML value as ``flwr run``'s ``--run-config`` parser reads it (its pattern takes a
    quoted string without its own quote character: a literal '...' or, failing that, "...")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # nan, inf and -inf are TOML floats too
    text = str(value)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return '"' + text.replace("\\", "\\\\") + '"'
    raise ValueError(f"invalid {key}={text!r}: flwr run cannot pass a string with both ' and \"")


def write_connection(flwr_home: Path, name: str, address: str, ca_cert: Path, default: bool = True) -> Path:
    """``$FLWR_HOME/config.toml`` naming the SuperLink for ``flwr run``/``flwr supernode``.

    Other connections in the file are kept; the one named ``name`` is replaced.
    """
    import tomllib

    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    data = tomllib.loads(path.read_text()) if path.exists() else {}
    links = {k: v for k, v in data.get("superlink", {}).items() if isinstance(v, dict) and k != name}
    links[name] = {"address": address, "root-certificates": str(ca_cert.resolve())}
    lines = [
        "[superlink]",
        f'default = "{name if default else data.get("superlink", {}).get("default", name)}"',
        "",
    ]
    for conn, fields_ in links.items():
        lines.append(f"[superlink.{conn}]")
        lines += [
            f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {str(v).lower()}" for k, v in fields_.items()
        ]
        lines.append("")
    path.write_text("\n".join(lines))
    return path
