"""A Grid that runs the ClientApp inside this process, one message after another.

No Ray, no SuperLink, no threads: the ServerApp's strategy sends its messages, and each is
handled by calling the very ClientApp that ``flwr run`` and the Ray runtime load, with one
persistent ``Context`` per node (so ledgers and ``Context.state`` behave as in a run). A
failing handler becomes an error reply, as Flower's runtime makes it.

It is the yardstick of ``bench/orchestration.py``: the same client work as a simulation,
timed per call with nothing around it, which is what "ideal" means there. It also makes a
run steppable in a debugger.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["SequentialGrid"]

#: Flower's error code for an exception raised inside a ClientApp.
_CLIENT_APP_RAISED = 2


class SequentialGrid(Grid):
    """``num_nodes`` nodes (partitions 0..n-1) whose ClientApp runs here, in order, when asked."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict, run_id: int = 1) -> None:
        self._app = client_app
        # Flower 1.42 stamps every Message with the task identity a runtime would have set
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, SUPERLINK_NODE_ID
        self._run = Run.create_empty(run_id=run_id)
        self._contexts = {
            node: Context(
                run_id=run_id,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for node in range(1, num_nodes + 1)
        }
        self._replies: dict[str, Message] = {}
        #: (message type, seconds) of every ClientApp call, in order (what the bench sums).
        self.calls: list[tuple[str, float]] = []

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(  # type: ignore[override]
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            msg.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            self._replies[msg.metadata.message_id] = self._handle(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))

    def _handle(self, msg: Message) -> Message:
        context = self._contexts[msg.metadata.dst_node_id]
        t0 = time.perf_counter()
        try:
            reply = self._app(msg, context)
        except Exception as err:  # what Flower's runtime does with a raising ClientApp
            error = Error(code=_CLIENT_APP_RAISED, reason=f"{type(err).__name__}: {err}")
            reply = Message(error, reply_to=msg)
        self.calls.append((msg.metadata.message_type, time.perf_counter() - t0))
        return reply
