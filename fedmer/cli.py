"""The ``fedmer`` command.

fedmer run [hydra overrides...]       one simulation (same as python -m simulations.run)
fedmer run -m key=a,b ...             a Hydra multirun sweep
fedmer privacy show LEDGER [--json]   a node's persistent privacy budget (spent epsilon, cap)
fedmer audit RUN_DIR [--client N]     membership-inference audit of a finished run's global model
fedmer report SWEEP_DIR [--out DIR]   tidy CSVs + Markdown report with plots for a sweep
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]

_COMMANDS = {
    "run": "run a federated simulation (Hydra overrides follow)",
    "privacy": "inspect a node's privacy ledger: fedmer privacy show LEDGER [--json]",
    "report": "tidy CSVs and a Markdown report for a sweep: fedmer report SWEEP_DIR [--out DIR]",
    "audit": "membership-inference audit of a finished run: fedmer audit RUN_DIR [--client N] [--shadows K]",
}


def _privacy(argv: list[str]) -> int:
    """``fedmer privacy show``: a bad or missing ledger is one line on stderr and exit code 2."""
    parser = argparse.ArgumentParser(prog="fedmer privacy", description="A node's persistent privacy budget")
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="spent epsilon, cap, runs and rounds of one ledger file")
    show.add_argument("ledger", help="path of the node's ledger JSON file")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)

    from fedmer.privacy.ledger import LedgerError, ledger_summary, show_ledger

    try:
        out = json.dumps(ledger_summary(args.ledger), indent=2) if args.json else show_ledger(args.ledger)
    except LedgerError as err:
        print(f"fedmer privacy: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _report(argv: list[str]) -> int:
    """``fedmer report``: a folder without finished runs is one line on stderr and exit code 2."""
    parser = argparse.ArgumentParser(prog="fedmer report", description="Report on a sweep of runs")
    parser.add_argument("sweep_dir", help="a Hydra multirun folder (or any folder of run folders)")
    parser.add_argument("--out", default=None, help="where to write the report (default: the sweep folder)")
    args = parser.parse_args(argv)

    from fedmer.report import write_report

    try:
        print(write_report(args.sweep_dir, args.out))
    except FileNotFoundError as err:
        print(f"fedmer report: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch a subcommand; unknown ones get the list of valid ones."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        parser = argparse.ArgumentParser(
            prog="fedmer", description="Federated multimodal emotion recognition"
        )
        parser.add_argument(
            "command", choices=sorted(_COMMANDS), help="; ".join(f"{k}: {v}" for k, v in _COMMANDS.items())
        )
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in _COMMANDS:
        print(
            f"fedmer: unknown command {command!r}; valid commands: {', '.join(sorted(_COMMANDS))}",
            file=sys.stderr,
        )
        return 2
    if command == "privacy":
        return _privacy(rest)
    if command == "report":
        return _report(rest)
    if command == "audit":
        from fedmer.audit_cli import main as audit_main

        return audit_main(rest)
    from simulations.run import main as hydra_main

    sys.argv = ["fedmer run", *rest]
    hydra_main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
