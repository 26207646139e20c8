"""The ``fedmer`` command.

fedmer run [hydra overrides...]     one simulation (same as python -m simulations.run)
fedmer run -m key=a,b ...           a Hydra multirun sweep
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Dispatch a subcommand; unknown ones get the list of valid ones."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": "run a federated simulation (Hydra overrides follow)"}
    if not argv or argv[0] in ("-h", "--help"):
        parser = argparse.ArgumentParser(
            prog="fedmer", description="Federated multimodal emotion recognition"
        )
        parser.add_argument(
            "command", choices=sorted(commands), help="; ".join(f"{k}: {v}" for k, v in commands.items())
        )
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in commands:
        print(
            f"fedmer: unknown command {command!r}; valid commands: {', '.join(sorted(commands))}",
            file=sys.stderr,
        )
        return 2
    from simulations.run import main as hydra_main

    sys.argv = ["fedmer run", *rest]
    hydra_main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
