"""A Grid that lists nodes in partition order, so seeded client sampling is reproducible.

Flower's strategies sample with ``random.sample(list(grid.get_node_ids()), k)``. Node
ids are random per run, so even with ``random`` seeded the same seed would pick
different vehicles or hospitals each time. This wrapper asks each new node once (a
QUERY message) which partition it holds and returns node ids sorted by that; with the
server's ``random`` seeded, the same seed then samples the same clients in every run,
in simulation and on real SuperNodes alike.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedmer import records as rk

__all__ = ["PartitionOrderedGrid", "SharedPartitionError", "short_reason"]

log = logging.getLogger(__name__)


class PartitionOrderedGrid(Grid):
    """Delegates to a Flower Grid; ``get_node_ids`` is ordered by each node's partition id."""

    def __init__(self, inner: Grid, timeout: float = 600.0) -> None:
        self._inner = inner
        self._timeout = timeout
        self.partition_of: dict[int, int] = {}

    # -- delegation ----------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._inner.set_run(run)

    @property
    def run(self) -> Run:
        return self._inner.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[no-untyped-def]
        return self._inner.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._inner.send_and_receive(messages, timeout=timeout)

    # -- ordering ------------------------------------------------------------------
    def get_node_ids(self) -> list[int]:
        nodes = list(self._inner.get_node_ids())
        unknown = [n for n in nodes if n not in self.partition_of]
        if unknown:
            self._ask_partitions(unknown)
        known = [n for n in nodes if n in self.partition_of]
        _refuse_shared_partitions({n: self.partition_of[n] for n in known})
        return sorted(known, key=lambda n: (self.partition_of[n], n))

    def _ask_partitions(self, nodes: list[int]) -> None:
        """Ask ``nodes`` for their partition id; a node that cannot answer stops the run.

        A node that fails here is misconfigured (wrong federation size, no partition-id),
        and leaving it out would make Flower's sampler wait for it forever.
        """
        queries = [
            Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes
        ]
        errors = []
        for reply in self._inner.send_and_receive(queries, timeout=self._timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                text = reply.error.reason or f"error code {reply.error.code} without a reason"
                errors.append(f"node {node}: {short_reason(text)}")
                continue
            self.partition_of[node] = int(rk.scalar(reply.content[rk.METRICS], rk.PARTITION_ID))
        if errors:
            raise RuntimeError(f"{len(errors)} node(s) could not start: " + "; ".join(sorted(set(errors))))


class SharedPartitionError(RuntimeError):
    """Two connected nodes claim the same partition id: one site would train twice, another never."""


def _refuse_shared_partitions(partition_of: dict[int, int]) -> None:
    by_pid: dict[int, list[int]] = {}
    for node, pid in partition_of.items():
        by_pid.setdefault(pid, []).append(node)
    clashes = {pid: nodes for pid, nodes in by_pid.items() if len(nodes) > 1}
    if clashes:
        text = "; ".join(
            f"partition-id={pid} claimed by nodes {sorted(ns)}" for pid, ns in sorted(clashes.items())
        )
        raise SharedPartitionError(
            f"{text}: every SuperNode needs its own partition-id (0..num-partitions-1) in --node-config"
        )


def short_reason(reason: str) -> str:
    """The ClientApp's own exception message, without Ray's wrapping traceback."""
    marker = "Message: "
    text = reason.rsplit(marker, 1)[-1] if marker in reason else reason
    return text.strip().rstrip("'>").strip()
