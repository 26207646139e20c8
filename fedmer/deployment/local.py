"""A whole secured federation on one machine: keys, SuperLink, registered SuperNodes, a run.

``fedmer deploy demo`` and the end-to-end tests both use :class:`LocalFederation`, so the
documented pilot is the tested one. Every process starts in its own session and is stopped by
its process group (SIGTERM, then SIGKILL) when the federation closes, also after a failure:
nothing is left behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from fedmer.deployment.certificates import FederationKeys, make_federation_keys
from fedmer.deployment.commands import (
    BIN,
    SiteNode,
    SuperLinkSpec,
    flower_env,
    flwr_run_command,
    register_command,
    superlink_command,
    supernode_command,
    write_connection,
)

__all__ = ["COMPLETED", "CONNECTION", "LocalFederation", "free_port", "run_status", "submitted_run_id"]

log = logging.getLogger(__name__)

#: The name of the SuperLink connection written into the federation's own FLWR_HOME.
CONNECTION = "fedmer-local"


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalFederation:
    """Key material, state, logs and processes of one local federation under ``root``."""

    root: Path
    sites: Sequence[str]
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.root / "flwr-home"
        self.env = flower_env(self.flwr_home)
        folder = self.root / "keys"
        self.keys = (
            FederationKeys(folder, tuple(self.sites))
            if (folder / "ca.crt").exists()
            else make_federation_keys(folder, ("localhost",), tuple(self.sites))
        )
        self.spec = SuperLinkSpec(self.keys, self.root / "state" / "superlink.db", port=self.port)
        self.spec.database.parent.mkdir(parents=True, exist_ok=True)
        write_connection(self.flwr_home, CONNECTION, self.spec.address, self.keys.ca_cert)

    # -- processes -------------------------------------------------------------------
    def start(self, name: str, argv: Sequence[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own session, logging to ``logs/<name>.log``."""
        if name in self.processes and self.processes[name].poll() is None:
            raise RuntimeError(f"{name} is already running (pid {self.processes[name].pid})")
        with open(self.logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                list(argv),
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=cwd,
            )
        self.processes[name] = proc
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Stop ``name``'s whole process group; SIGKILL when SIGTERM is not enough."""
        proc = self.processes.get(name)
        if proc is None:
            return None
        for s in (sig, signal.SIGKILL):
            try:
                os.killpg(proc.pid, s)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        return proc.poll()

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def close(self) -> None:
        """Stop every process this federation started (SuperNodes first, then the SuperLink)."""
        for name in sorted(self.processes, key=lambda n: n == "superlink"):
            self.stop(name)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the federation ---------------------------------------------------------------
    def start_superlink(self, timeout: float = 60.0) -> None:
        """The SuperLink with TLS and node authentication; returns once its port answers."""
        proc = self.start("superlink", superlink_command(self.spec))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the SuperLink exited with {proc.returncode}:\n{self.log_tail('superlink')}"
                )
            time.sleep(0.3)
        raise TimeoutError(f"the SuperLink did not open port {self.port} in {timeout:.0f} s")

    def register(self, site: str) -> subprocess.CompletedProcess[str]:
        """Admit ``site``'s public key (``flwr supernode register``)."""
        cmd = register_command(self.keys.node_public_key(site), CONNECTION, name=site)
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)

    def start_supernode(self, node: SiteNode, key_of: str | None = None, extra: Sequence[str] = ()) -> None:
        """Start ``node`` over TLS with the key of ``key_of`` (default: its own site)."""
        key = self.keys.node_key(key_of or node.site)
        cmd = supernode_command(node, self.spec.address, self.keys.ca_cert, key, runtime_port=free_port())
        self.start(node.site, [*cmd, *extra])

    def submit(self, app_dir: Path, run_config: Mapping[str, object]) -> subprocess.Popen[bytes]:
        """Submit the FedMER app with ``flwr run`` (logs in ``logs/flwr-run.log``); do not wait."""
        return self.start("flwr-run", flwr_run_command(app_dir, CONNECTION, run_config), cwd=app_dir)

    def run_app(self, app_dir: Path, run_config: Mapping[str, object], timeout: float = 600.0) -> int:
        """Submit the app, wait for it, and return 0 only if the SuperLink says the run completed.

        ``flwr run --stream`` exits 0 even when the ServerApp raised (flwr 1.42), so the exit
        code alone would report a failed run as a success; the run's status decides.
        """
        proc = self.submit(app_dir, run_config)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop("flwr-run")
            raise TimeoutError(
                f"flwr run did not finish in {timeout:.0f} s:\n{self.log_tail('flwr-run')}"
            ) from None
        status = self.run_status(submitted_run_id(self.log_tail("flwr-run", 10**7)))
        log.info("flwr run exited %d; the SuperLink reports the run %s", rc, status)
        return rc if rc != 0 else (0 if status == COMPLETED else 1)

    def run_status(self, run_id: int | None) -> str:
        """``finished:completed``, ``finished:failed``, ... as ``flwr ls`` reports it."""
        return run_status(self.env, CONNECTION, run_id)


#: The status ``flwr ls`` gives a run whose ServerApp returned normally.
COMPLETED = "finished:completed"
_STARTED = re.compile(r"Successfully started run (\d+)")


def submitted_run_id(flwr_run_output: str) -> int | None:
    """The run id ``flwr run`` printed (the last one, if the log holds several)."""
    found = _STARTED.findall(flwr_run_output)
    return int(found[-1]) if found else None


def run_status(env: Mapping[str, str], connection: str, run_id: int | None) -> str:
    """The SuperLink's status of ``run_id`` (``unknown`` when it cannot be read)."""
    if run_id is None:
        return "unknown"
    cmd = [_flwr(), "ls", connection, "--run-id", str(run_id), "--format", "json"]
    done = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=120)
    try:
        runs = json.loads(done.stdout)["runs"]
        return str(runs[0]["status"])
    except (json.JSONDecodeError, KeyError, IndexError):
        return "unknown"


def _flwr() -> str:
    return str(BIN / "flwr")
