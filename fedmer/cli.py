"""The ``fedmer`` command.

fedmer run [hydra overrides...]       one simulation (same as python -m simulations.run)
fedmer run -m key=a,b ...             a Hydra multirun sweep
fedmer privacy show LEDGER [--json]   a node's persistent privacy budget (spent epsilon, cap)
fedmer audit RUN_DIR [--client N]     membership-inference audit of a finished run's global model
fedmer report SWEEP_DIR [--out DIR]   tidy CSVs + Markdown report with plots for a sweep
fedmer missing RUN_DIR                the global model with modalities missing at test time
fedmer explain RUN_DIR [--n N]        per-prediction modality contributions (weights, ablation)
fedmer personalize RUN_DIR            per-client DP fine-tune of the fusion head, ledger-accounted
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

__all__ = ["COMMAND_GROUP", "main"]

#: Entry-point group of commands that live outside the library (``run`` is Hydra's, in
#: ``simulations/``): the library never imports an app, the app registers itself here.
COMMAND_GROUP = "fedmer.commands"

_COMMANDS = {
    "run": "run a federated simulation (Hydra overrides follow)",
    "privacy": "inspect a node's privacy ledger: fedmer privacy show LEDGER [--json]",
    "report": "tidy CSVs and a Markdown report for a sweep: fedmer report SWEEP_DIR [--out DIR]",
    "audit": "membership-inference audit of a finished run: fedmer audit RUN_DIR [--client N] [--shadows K]",
    "missing": "missing modalities at test time: fedmer missing RUN_DIR [--rates R ...] [--draws K]",
    "explain": "modality contributions of predictions: fedmer explain RUN_DIR [--index I ...|--n N]",
    "personalize": "per-client head fine-tune with DP: fedmer personalize RUN_DIR [--epochs E] [--no-dp]",
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

    from fedmer.results.report import write_report

    try:
        print(write_report(args.sweep_dir, args.out))
    except FileNotFoundError as err:
        print(f"fedmer report: {err}", file=sys.stderr)
        return 2
    return 0


def _run_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("run_dir", type=Path, help="a finished run folder (config.json, model.pt)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the run folder)")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of a table")
    return parser


def _post_hoc(
    prog: str, run: Callable[[], dict], format_table: Callable[[dict], str], args: argparse.Namespace
) -> int:
    """Run one post-hoc tool; a bad run folder or setting is one line on stderr and exit code 2."""
    import torch

    from fedmer.results.reader import RunError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # tiny models: one thread is faster, much faster on a busy machine
    try:
        report = run()
    except (RunError, ValueError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    if not args.json:
        print(f"wrote into {args.out or args.run_dir}")
    return 0


def _missing(argv: list[str]) -> int:
    parser = _run_parser("fedmer missing", "Score a run's global model with modalities missing at test time")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--draws", type=int, default=5, help="random draws per rate (mean and sd reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from fedmer.posthoc.missing.report import format_table, missing_run

    def run() -> dict:
        return missing_run(args.run_dir, args.out, rates=args.rates, draws=args.draws, seed=args.seed)

    return _post_hoc("fedmer missing", run, format_table, args)


def _explain(argv: list[str]) -> int:
    parser = _run_parser("fedmer explain", "Per-prediction modality contributions of a run's global model")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--index", type=int, nargs="+", help="test-split indices to explain")
    which.add_argument("--n", type=int, default=6, help="explain N test samples drawn at random")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random choice of samples")
    args = parser.parse_args(argv)
    from fedmer.posthoc.explain.report import explain_run, format_explanations

    def run() -> dict:
        return explain_run(args.run_dir, args.out, indices=args.index, n=args.n, seed=args.seed)

    return _post_hoc("fedmer explain", run, format_explanations, args)


def _personalize(argv: list[str]) -> int:
    parser = _run_parser("fedmer personalize", "Per-client fine-tune of the fusion head, DP-accounted")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=None, help="default: the run's federation.lr")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's batch size")
    parser.add_argument("--target-epsilon", type=float, default=1.0, help="epsilon of the fine-tune alone")
    parser.add_argument("--delta", type=float, default=None, help="must equal the run's delta (default)")
    parser.add_argument("--cap", type=float, default=None, help="replace the ledgers' epsilon cap")
    parser.add_argument("--ledger-dir", type=Path, default=None, help="default: RUN_DIR/ledgers")
    parser.add_argument("--no-dp", action="store_true", help="non-private fine-tune, for comparison")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from fedmer.posthoc.personalize.finetune import PersonalizeSettings
    from fedmer.posthoc.personalize.report import format_table, personalize_run

    def run() -> dict:
        settings = PersonalizeSettings(
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            target_epsilon=args.target_epsilon,
            delta=args.delta,
            dp=not args.no_dp,
            cap=args.cap,
            seed=args.seed,
        )
        return personalize_run(args.run_dir, settings, args.out, ledger_dir=args.ledger_dir)

    return _post_hoc("fedmer personalize", run, format_table, args)


def _audit(argv: list[str]) -> int:
    """``fedmer audit``: membership-inference audit; writes RUN_DIR/audit.json and audit_roc.png."""
    parser = argparse.ArgumentParser(
        prog="fedmer audit",
        description="Membership-inference audit (loss threshold, LiRA) of a run's final global model",
    )
    parser.add_argument("run_dir", type=Path, help="run folder holding config.json and model.pt")
    parser.add_argument("--client", type=int, default=0, help="client whose training data are the members")
    parser.add_argument("--shadows", type=int, default=8, help="LiRA shadow models (0: loss attack only)")
    parser.add_argument("--seed", type=int, default=0, help="seeds subsampling, shadow splits, bootstrap")
    parser.add_argument(
        "--no-background",
        action="store_true",
        help="train shadows on the candidates only (attacker without the other clients' data)",
    )
    parser.add_argument("--json", action="store_true", help="print the audit report as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from fedmer.posthoc.audit import AuditError, audit_run, format_table
    from fedmer.results.layout import AUDIT_JSON, AUDIT_PNG

    try:
        report = audit_run(
            args.run_dir,
            client=args.client,
            shadows=args.shadows,
            seed=args.seed,
            background=not args.no_background,
        )
    except AuditError as err:
        print(f"fedmer audit: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
        print(f"wrote {args.run_dir / AUDIT_JSON} and {args.run_dir / AUDIT_PNG}")
    return 0


def _plugin(command: str) -> Callable[[list[str]], int] | None:
    """A command registered by an app under :data:`COMMAND_GROUP` (``run``), if installed."""
    for ep in entry_points(group=COMMAND_GROUP):
        if ep.name == command:
            fn: Callable[[list[str]], int] = ep.load()
            return fn
    return None


_HANDLERS: dict[str, Callable[[list[str]], int]] = {
    "privacy": _privacy,
    "report": _report,
    "audit": _audit,
    "missing": _missing,
    "explain": _explain,
    "personalize": _personalize,
}


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
    if command in _HANDLERS:
        return _HANDLERS[command](rest)
    plugin = _plugin(command)
    if plugin is None:
        print(
            f"fedmer {command}: not installed (no {COMMAND_GROUP!r} entry point named {command!r}); "
            "reinstall the project with `pip install -e .` (make setup)",
            file=sys.stderr,
        )
        return 2
    return plugin(rest)


if __name__ == "__main__":
    raise SystemExit(main())
