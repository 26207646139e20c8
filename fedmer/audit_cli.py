"""``fedmer audit RUN_DIR``: membership-inference audit of a finished run's global model.

    fedmer audit outputs/2025-01-01/12-00-00 [--client 0] [--shadows 8] [--seed 0] [--json]

Writes RUN_DIR/audit.json and RUN_DIR/audit_roc.png and prints a table (or the JSON).
A folder that cannot be audited is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the audit; return the exit code."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from fedmer.privacy.audit import AuditError, audit_run, format_table

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
        print(f"wrote {args.run_dir / 'audit.json'} and {args.run_dir / 'audit_roc.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
