"""Work around two costs of Flower 1.42's simulation runtime that grow with the registered nodes.

Measured with ``python -m bench.scale --flower-costs`` (figures in docs/performance.md):

* **Message polling.** The runtime's polling thread (``vce_api.add_messages_to_queue``) asks
  the LinkState, every 0.1 s and for every registered node in turn, for that node's next
  message; each ask walks every stored message and re-checks its expiry under the state's
  lock. A sweep is O(nodes x messages): at 10,000 nodes with a round's 20 messages in flight
  it kept a core busy in the driver, taking CPU from the two training actors of a 2-core
  machine. :func:`_add_messages_to_queue` makes one pass over the stored messages per sweep
  and hands each node its first undelivered one, in node order: the same messages, in the
  same order, marked delivered the same way, in O(messages).
* **Context registration.** Registering each node's context parses the app's pyproject.toml
  and fuses the run's overrides into it once per node (``get_fused_config_from_dir``). The
  file and the overrides are the same for every node of a run, so :func:`_fused_config` reads
  them once and gives each node its own copy.

The poller also sweeps every :data:`POLL_INTERVAL_S` (0.01 s) instead of Flower's 0.1 s; the
server's grid pulls replies at the same pace (``fedmer.federation.grid.PULL_INTERVAL_S``).

Both replace module attributes of flwr for the duration of :func:`flower_patches` only, and the
poller only for Flower's in-memory LinkState (any other state keeps Flower's own loop); the
flwr pin below 1.43 guards the internals they rely on. What remains per node is Flower's own
bookkeeping: a ``Context`` and node record for each registered node, as Flower designs it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from queue import Queue
from typing import Any

from flwr.app import Message
from flwr.compat.client import run_info_store
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkState
from flwr.supercore.date import now

__all__ = ["FLOWER_POLL_INTERVAL_S", "POLL_INTERVAL_S", "flower_patches", "poll_once"]

#: Seconds between sweeps. Flower's loop waits 0.1 s (``f_stop.wait(0.1)``), so a round's messages
#: waited 50 ms on average before any actor saw them; a sweep is one pass over the few messages
#: in flight, so sweeping every 10 ms costs the driver little (docs/performance.md).
POLL_INTERVAL_S = 0.01
#: Flower's own interval, for comparisons (``bench.scale --flower-costs``).
FLOWER_POLL_INTERVAL_S = 0.1

_FLOWER_POLL = vce_api.add_messages_to_queue
_FLOWER_FUSED = run_info_store.get_fused_config_from_dir
_lock = threading.Lock()


def poll_once(state: InMemoryLinkState, rank: Mapping[int, int]) -> list[Message]:
    """Each node's first undelivered message, in node order (``rank``), now marked delivered.

    What one sweep of Flower's loop returns (``get_message_ins(node, limit=1)`` for every node),
    with each stored message looked at once instead of once per node.
    """
    first: dict[int, Message] = {}
    with state.lock:
        for msg_id in list(state.message_ins_store.keys()):
            state._check_stored_messages({msg_id})  # expiry and federation, as Flower checks them
            msg = state.message_ins_store.get(msg_id)
            if msg is None or msg.metadata.delivered_at != "":
                continue
            dst = msg.metadata.dst_node_id
            if dst in rank and dst not in first:
                first[dst] = msg
        found = sorted(first.values(), key=lambda m: rank[m.metadata.dst_node_id])
        delivered_at = now().isoformat()
        for msg in found:
            msg.metadata.delivered_at = delivered_at
    return found


def _add_messages_to_queue(
    state: LinkState, queue: Queue[Message], nodes_mapping: Mapping[int, int], f_stop: threading.Event
) -> None:
    """Flower's polling loop, one pass over the stored messages per sweep (see the module docstring)."""
    if not isinstance(state, InMemoryLinkState):
        _FLOWER_POLL(state, queue, dict(nodes_mapping), f_stop)
        return
    rank = {node: i for i, node in enumerate(nodes_mapping)}
    while not f_stop.is_set():
        for msg in poll_once(state, rank):
            queue.put(msg)
        f_stop.wait(POLL_INTERVAL_S)


@functools.lru_cache(maxsize=4)
def _fused_once(project_dir: str, override: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    return dict(_FLOWER_FUSED(Path(project_dir), dict(override)))


def _fused_config(project_dir: Path, override_config: Mapping[str, Any]) -> dict[str, Any]:
    """``get_fused_config_from_dir`` read once per run: a fresh copy for each node."""
    try:
        key = tuple(sorted(override_config.items()))
        hash(key)
    except TypeError:  # an unhashable override value: Flower's own path
        return dict(_FLOWER_FUSED(project_dir, dict(override_config)))
    return dict(_fused_once(str(Path(project_dir).resolve()), key))


@contextlib.contextmanager
def flower_patches() -> Iterator[None]:
    """Flower's runtime with the two workarounds above while the block runs."""
    with _lock:
        vce_api.add_messages_to_queue = _add_messages_to_queue  # type: ignore[assignment]
        run_info_store.get_fused_config_from_dir = _fused_config  # type: ignore[assignment]
    try:
        yield
    finally:
        with _lock:
            vce_api.add_messages_to_queue = _FLOWER_POLL
            run_info_store.get_fused_config_from_dir = _FLOWER_FUSED
            _fused_once.cache_clear()
