"""``fedmer deploy``: keys, SuperLink, node registration, SuperNodes and runs of a real federation.

Each subcommand prints the Flower command it runs, so an operator sees (and can script) the exact
1.42 flags. ``superlink`` and ``supernode`` replace this process with Flower's (``--print`` only
prints), so a service manager (systemd, a container) supervises Flower itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from fedmer.deployment.certificates import FederationKeys, add_node_key, make_federation_keys
from fedmer.deployment.commands import (
    SiteNode,
    SuperLinkSpec,
    flower_env,
    register_command,
    superlink_command,
    supernode_command,
    write_connection,
)

__all__ = ["main"]


def _set_pairs(pairs: Sequence[str]) -> dict[str, object]:
    """``key=value`` run-config pairs; numbers become numbers (Flower's run config is typed)."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"invalid --set {pair!r}: expected key=value, e.g. federation.num_rounds=5")
        out[key] = _typed(value)
    return out


def _typed(text: str) -> object:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _exec(cmd: list[str], print_only: bool) -> int:
    print(shlex.join(cmd), flush=True)
    if print_only:
        return 0
    os.execvpe(cmd[0], cmd, flower_env())
    return 0  # not reached


def _keys(args: argparse.Namespace) -> int:
    keys = make_federation_keys(
        args.out, tuple(args.server_name), tuple(args.node), args.days, args.overwrite
    )
    print(f"CA:                 {keys.ca_cert}   (every node gets a copy: --root-certificates)")
    san = ", ".join([*args.server_name, "127.0.0.1"])
    print(f"SuperLink cert/key: {keys.server_cert}, {keys.server_key}   (SAN: {san})")
    for site in args.node:
        print(f"node {site}: private {keys.node_key(site)} (stays on the node)")
        print(f"    public {keys.node_public_key(site)} (register it with the SuperLink)")
    return 0


def _add_node(args: argparse.Namespace) -> int:
    private, public = add_node_key(args.keys, args.node)
    print(f"node {args.node}: private {private} (stays on the node), public {public} (register it)")
    return 0


def _connection(args: argparse.Namespace) -> int:
    home = Path(args.flwr_home or os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    path = write_connection(home, args.name, args.address, Path(args.ca))
    print(f"wrote connection {args.name!r} ({args.address}, CA {args.ca}) into {path}")
    return 0


def _superlink(args: argparse.Namespace) -> int:
    spec = SuperLinkSpec(FederationKeys(Path(args.keys)), Path(args.database), args.host, args.port)
    spec.database.parent.mkdir(parents=True, exist_ok=True)
    return _exec(superlink_command(spec), args.print)


def _register(args: argparse.Namespace) -> int:
    cmd = register_command(
        FederationKeys(Path(args.keys)).node_public_key(args.node), args.connection, args.node
    )
    print(shlex.join(cmd), flush=True)
    return subprocess.run(cmd, env=flower_env()).returncode


def _supernode(args: argparse.Namespace) -> int:
    node = SiteNode(
        site=args.site,
        partition_id=args.partition_id,
        num_partitions=args.num_partitions,
        ledger=Path(args.ledger).resolve(),
        data_file=Path(args.data_file).resolve() if args.data_file else None,
        epsilon_cap=args.epsilon_cap,
    )
    cmd = supernode_command(node, args.superlink, Path(args.ca), Path(args.key), args.runtime_port)
    return _exec(cmd, args.print)


def _site_data(args: argparse.Namespace) -> int:
    from fedmer.config import ExperimentConfig
    from fedmer.deployment.site_data import write_site_files

    cfg = ExperimentConfig.from_run_config({"federation.num_clients": len(args.site), **_set_pairs(args.set)})
    for site, path in write_site_files(cfg, args.site, args.out).items():
        print(f"{site}: {path}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    """Validate the run config as the ServerApp will, then ``flwr run``; then ask how the run ended.

    Both checks are needed because ``flwr run`` (1.42) exits 0 when the ServerApp fails: a bad
    value would otherwise print the ServerApp's traceback and look like a success.
    """
    from fedmer.config import ConfigError
    from fedmer.deployment.commands import checked_run_config, flwr_run_command
    from fedmer.deployment.local import COMPLETED, run_status, submitted_run_id

    run_config = _set_pairs(args.set)
    try:
        checked_run_config(Path(args.app), run_config)
    except ConfigError as err:
        print(f"fedmer deploy submit: configuration error: {err}; nothing was submitted", file=sys.stderr)
        return 2
    cmd = flwr_run_command(Path(args.app), args.connection, run_config)
    print(shlex.join(cmd), flush=True)
    proc = subprocess.Popen(
        cmd, env=flower_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    rc = proc.wait()
    status = run_status(flower_env(), args.connection, submitted_run_id("".join(lines)))
    print(f"fedmer deploy submit: flwr run exited {rc}; the SuperLink reports the run {status}")
    return rc or (0 if status == COMPLETED else 1)


def _demo(args: argparse.Namespace) -> int:
    from fedmer.config import ExperimentConfig
    from fedmer.deployment.commands import checked_run_config
    from fedmer.deployment.local import LocalFederation
    from fedmer.deployment.site_data import write_site_files

    sites = [f"car-{i // 2 + 1}" if i % 2 == 0 else f"hospital-{i // 2 + 1}" for i in range(args.sites)]
    run = {"federation.num_clients": args.sites, "federation.num_rounds": args.rounds, **_set_pairs(args.set)}
    checked_run_config(Path(args.app), run)  # before any key, process or site file is made
    root = Path(args.out).resolve()
    with LocalFederation(root, sites) as fed:
        write_site_files(ExperimentConfig.from_run_config(run), sites, root / "sites")
        fed.start_superlink()
        print(f"SuperLink on {fed.spec.address} (TLS, node authentication); logs in {fed.logs}")
        for i, site in enumerate(sites):
            done = fed.register(site)
            if done.returncode != 0:
                print(
                    f"fedmer deploy demo: registering {site} failed:\n{done.stdout}{done.stderr}",
                    file=sys.stderr,
                )
                return 1
            home = root / "sites" / site
            fed.start_supernode(SiteNode(site, i, len(sites), home / "ledger.json", home / "data.npz"))
            print(f"SuperNode {site}: data {home / 'data.npz'}, ledger {home / 'ledger.json'}")
        out = root / "run"
        rc = fed.run_app(Path(args.app).resolve(), {**run, "output.dir": str(out)}, timeout=args.timeout)
    print(
        f"fedmer deploy demo: {'completed' if rc == 0 else 'FAILED'}; results in {out}, flwr log {fed.logs}"
    )
    return rc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmer deploy", description="A secured Flower federation of real nodes"
    )
    sub = parser.add_subparsers(dest="action", required=True)

    p = sub.add_parser("keys", help="create a CA, the SuperLink certificate and one key pair per node")
    p.add_argument("--out", required=True, help="folder for the key material")
    p.add_argument("--server-name", action="append", default=None, help="name/IP nodes dial (repeat)")
    p.add_argument("--node", action="append", default=[], help="a site name (repeat): car-1, hospital-1, ...")
    p.add_argument("--days", type=int, default=365, help="certificate validity")
    p.add_argument("--overwrite", action="store_true", help="replace existing key material")
    p.set_defaults(fn=_keys)

    p = sub.add_parser("add-node", help="one more node key pair in an existing key folder")
    p.add_argument("--keys", required=True)
    p.add_argument("--node", required=True)
    p.set_defaults(fn=_add_node)

    p = sub.add_parser("connection", help="name the SuperLink for flwr (writes $FLWR_HOME/config.toml)")
    p.add_argument("--name", default="fedmer")
    p.add_argument("--address", required=True, help="HOST:PORT of the SuperLink")
    p.add_argument("--ca", required=True, help="the CA certificate (ca.crt)")
    p.add_argument("--flwr-home", default=None, help="default: $FLWR_HOME or ~/.flwr")
    p.set_defaults(fn=_connection)

    p = sub.add_parser("superlink", help="run the SuperLink: TLS, node authentication, state database")
    p.add_argument("--keys", required=True, help="folder made by `fedmer deploy keys`")
    p.add_argument("--database", required=True, help="state database (node registrations survive restarts)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept remote nodes")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--print", action="store_true", help="print the command only")
    p.set_defaults(fn=_superlink)

    p = sub.add_parser("register", help="admit a node's public key (flwr supernode register)")
    p.add_argument("--keys", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--connection", default="fedmer")
    p.set_defaults(fn=_register)

    p = sub.add_parser(
        "supernode", help="run one site's SuperNode over TLS with its own key, data and ledger"
    )
    p.add_argument("--superlink", required=True, help="HOST:PORT")
    p.add_argument("--ca", required=True, help="the CA certificate (ca.crt)")
    p.add_argument("--key", required=True, help="this node's private key")
    p.add_argument("--site", required=True)
    p.add_argument("--partition-id", type=int, required=True, help="this node's index, 0..num-partitions-1")
    p.add_argument("--num-partitions", type=int, required=True, help="number of sites in the federation")
    p.add_argument("--ledger", required=True, help="this node's privacy ledger (on its own disk)")
    p.add_argument("--data-file", default=None, help="this site's data file (.npz); default: a partition")
    p.add_argument("--epsilon-cap", type=float, default=None, help="the node's own lifetime epsilon cap")
    p.add_argument(
        "--runtime-port", type=int, default=9094, help="local ClientApp API port (distinct per node)"
    )
    p.add_argument("--print", action="store_true", help="print the command only")
    p.set_defaults(fn=_supernode)

    p = sub.add_parser("site-data", help="write demo site files: partition i of a dataset for site i")
    p.add_argument("--out", required=True)
    p.add_argument("--site", action="append", required=True, help="site name (repeat, in partition order)")
    p.add_argument("--set", action="append", default=[], help="run-config key=value (repeat)")
    p.set_defaults(fn=_site_data)

    for name, fn, text in (
        ("submit", _submit, "submit the FedMER app with flwr run; exit 1 unless the run completed"),
        ("demo", _demo, "a whole local federation: keys, SuperLink, SuperNodes with site files, one run"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--app", default=".", help="the FedMER project folder (pyproject.toml)")
        p.add_argument("--set", action="append", default=[], help="run-config key=value (repeat)")
        p.set_defaults(fn=fn)
        if name == "submit":
            p.add_argument("--connection", default="fedmer")
        else:
            p.add_argument("--out", required=True, help="working folder (keys, state, sites, logs, run)")
            p.add_argument("--sites", type=int, default=3)
            p.add_argument("--rounds", type=int, default=3)
            p.add_argument("--timeout", type=float, default=1800.0, help="seconds for the run")
    return parser


def main(argv: list[str]) -> int:
    """Entry of ``fedmer deploy``; bad input is one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    if getattr(args, "server_name", ...) is None:
        args.server_name = ["localhost"]
    try:
        return int(args.fn(args))
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"fedmer deploy {args.action}: {err}", file=sys.stderr)
        return 2
