"""The run's progress as a person watches it: a rich progress bar and one log line per round."""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["RoundProgress", "round_status"]

log = logging.getLogger("server.app")


def round_status(row: dict[str, Any], client_delta: float | None = None) -> str:
    """Held-out UAR and the round's epsilon with its delta, accountant and unit."""
    status = f"UAR {row['uar']:.3f}  max ε {row['epsilon_max']:.2f}"
    if row["delta"] is not None:
        status += f" (δ={row['delta']:g}, {row['accountant']}, per sample)"
    if row.get("client_epsilon") is not None:
        status += f"  client-level ε {row['client_epsilon']:.2f} (δ={client_delta:g}, per client)"
    return status


class RoundProgress:
    """A progress bar over the run's rounds (use as a context manager), and a log line per round."""

    def __init__(self, num_rounds: int) -> None:
        self._bar = Progress(
            TextColumn("[bold]FedMER[/] round"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
        )
        self._task = self._bar.add_task("rounds", total=num_rounds, status="")

    def __enter__(self) -> RoundProgress:
        self._bar.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._bar.__exit__(kind, err, tb)

    def update(self, row: dict[str, Any], client_delta: float | None = None) -> None:
        """Show round ``row['round']`` as done, with its metrics and epsilon."""
        status = round_status(row, client_delta)
        self._bar.update(self._task, completed=row["round"], status=status)
        log.info(
            "round %d: held-out UAR %.4f, macro-F1 %.4f, acc %.4f | %s",
            row["round"],
            row["uar"],
            row["macro_f1"],
            row["accuracy"],
            status,
        )
