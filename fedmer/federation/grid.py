"""A Grid that lists nodes in partition order, so seeded client sampling is reproducible.

Flower's strategies sample with ``random.sample(list(grid.get_node_ids()), k)``. Node
ids are random per run, so even with ``random`` seeded the same seed would pick
different vehicles or hospitals each time. This wrapper learns which partition each node
holds and returns node ids sorted by that; with the server's ``random`` seeded, the same
seed then samples the same clients in every run, in simulation and on real SuperNodes alike.

How it learns the partition: on real SuperNodes it asks each new node once (a QUERY message).
In Flower's simulation runtime the mapping is already known: the runtime registers its N
nodes one by one in its in-memory LinkState and gives the i-th ``partition-id=i`` (flwr 1.42,
``vce_api._register_nodes``; the pin below 1.43 guards it), and that state lists nodes in
registration order. Asking instead cost one Ray round trip per node: 328 s at 10,000 nodes.
If the registered count disagrees with the run's ``federation.num_clients`` (a mismatched
``num-supernodes``), the nodes are asked after all, and their errors stop the run as before.

It also waits for replies itself (:meth:`PartitionOrderedGrid.send_and_receive`): Flower's grids
sleep a fixed time between pulls, 0.1 s in simulation (``InMemoryGrid``) and 3 s against a
SuperLink (``HttpGrid``), so a round's last reply waits on average half that before the server
sees it. A simulated round of the default run is ~1.5 s here, so 0.1 s of it was waiting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

if TYPE_CHECKING:  # the SuperLink's modules take ~0.7 s to import; a ClientApp never needs them
    from flwr.supercore.run import Run

from fedmer import records as rk

__all__ = [
    "PULL_INTERVAL_S",
    "REGISTRATION_SETTLE_S",
    "PartitionOrderedGrid",
    "SharedPartitionError",
    "registration_order",
    "short_reason",
]

log = logging.getLogger(__name__)

#: Seconds the simulation's node count must stay below ``expected`` before the nodes are asked.
REGISTRATION_SETTLE_S = 5.0
#: Seconds between pulls for replies: in simulation a pull is a lookup in the in-memory state;
#: against a SuperLink it is one request (Flower's newer ``RuntimeAgentGrid`` also polls at 0.25 s).
PULL_INTERVAL_S = {"in-memory": 0.01, "remote": 0.25}


def registration_order(grid: Grid) -> list[int] | None:
    """Node ids in the order Flower's simulation runtime registered them (node i holds partition i).

    None for any other grid (deployment: only the nodes know their partition).
    """
    from flwr.server.superlink.linkstate import InMemoryLinkState
    from flwr.superlink.grid import InMemoryGrid

    if not isinstance(grid, InMemoryGrid) or not isinstance(grid.state, InMemoryLinkState):
        return None
    return [info.node_id for info in grid.state.get_node_info()]


def _in_memory(grid: Grid) -> bool:
    """Whether ``grid`` is Flower's simulation grid (its pulls are cheap); imported only on the server."""
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


class PartitionOrderedGrid(Grid):
    """Delegates to a Flower Grid; ``get_node_ids`` is ordered by each node's partition id.

    ``expected`` is the run's ``federation.num_clients``: in simulation the registration order
    is trusted once that many nodes are registered (see the module docstring).
    """

    def __init__(self, inner: Grid, timeout: float = 600.0, expected: int | None = None) -> None:
        self._inner = inner
        self._timeout = timeout
        self._expected = expected
        self._count_since: tuple[int, float] = (-1, 0.0)  # registered count and when it was first seen
        self.partition_of: dict[int, int] = {}
        self.queried = 0  # nodes asked for their partition (0 in a simulation whose mapping is known)
        self.pull_interval = PULL_INTERVAL_S["in-memory" if _in_memory(inner) else "remote"]

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
        """Push ``messages``; pull every ``pull_interval`` until each has its reply or ``timeout`` passes.

        Flower's own loop, with this grid's interval instead of Flower's fixed sleep (see the
        module docstring); what arrives, and what a timeout leaves out, is the same.
        """
        pending = set(self._inner.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self._inner.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            left = None if deadline is None else deadline - time.monotonic()
            if not pending or (left is not None and left <= 0):
                break
            time.sleep(self.pull_interval if left is None else min(self.pull_interval, left))
        return replies

    # -- ordering ------------------------------------------------------------------
    def get_node_ids(self) -> list[int]:
        nodes = list(self._inner.get_node_ids())
        unknown = [n for n in nodes if n not in self.partition_of]
        if unknown:
            registered = self._registered()
            if registered is None:
                self._ask_partitions(unknown)
            elif self._expected is None or len(registered) == self._expected:
                self.partition_of.update(registered)  # the whole federation: known for good
            else:  # maybe still registering: list the registered nodes, keep nothing yet
                pending = {n: registered[n] for n in nodes if n in registered}
                _refuse_shared_partitions(pending)
                return sorted(pending, key=lambda n: (pending[n], n))
        known = [n for n in nodes if n in self.partition_of]
        _refuse_shared_partitions({n: self.partition_of[n] for n in known})
        return sorted(known, key=lambda n: (self.partition_of[n], n))

    def _registered(self) -> dict[int, int] | None:
        """Partition id of each node from the simulation's registration order; None: ask the nodes.

        While fewer than ``expected`` nodes are registered the runtime may still be registering
        them: node i is partition i whatever follows, and the sampler waits for the rest. A
        count that stays short for ``REGISTRATION_SETTLE_S``, or one above ``expected``, means
        the federation does not match the config: then the nodes are asked, and say why.
        """
        order = registration_order(self._inner)
        if order is None:
            return None
        count, now = len(order), time.monotonic()
        if self._expected is not None and count != self._expected:
            if count > self._expected:
                return None
            if count != self._count_since[0]:
                self._count_since = (count, now)
            elif now - self._count_since[1] >= REGISTRATION_SETTLE_S:
                return None
        return {node: pid for pid, node in enumerate(order)}

    def _ask_partitions(self, nodes: list[int]) -> None:
        """Ask ``nodes`` for their partition id; a node that cannot answer stops the run.

        A node that fails here is misconfigured (wrong federation size, no partition-id),
        and leaving it out would make Flower's sampler wait for it forever.
        """
        queries = [
            Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes
        ]
        self.queried += len(nodes)
        errors = []
        for reply in self.send_and_receive(queries, timeout=self._timeout):
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
