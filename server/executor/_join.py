"""Joins: how a node with several input slots forms its input sets (see ``_session``).

A node with several slots (several ports, or a ``many`` port with several connections, or
client-fed ports) joins by sequence number: it runs once per sequence for which every slot holds
a value, pairing values of the same sequence on one slot first in, first out. Optional client-fed
ports are not slots: their latest value (``sticky``) is passed with every input set formed after
it. Sequences that never complete wait in a buffer bounded by ``limit``, past which the session
fails with ``LimitExceeded``; ``leftover`` counts what is still incomplete.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from tensorline.server._errors import LimitExceeded

# Inbox item whose slot is EOS: one producer of the node has finished.
EOS = -1
# Inbox item whose slot is STICKY carries (port, value) for an optional client-fed port; it
# travels through the inbox so it applies from its place in the stream on.
STICKY = -2
# Inbox item whose slot is HANDOFF carries a node call its producer started and could not finish
# in its own task (the node suspended, or failed): the stage finishes it in order.
HANDOFF = -3


@dataclass(frozen=True, slots=True)
class Slot:
    port: str
    many: bool


class Join:
    """Collects one value per slot for each sequence (see the module docstring)."""

    __slots__ = ("_count", "_limit", "_node_id", "_optional", "_pending", "_slots", "sticky")

    def __init__(self, node_id: str, slots: list[Slot], optional: list[str], limit: int) -> None:
        self._node_id = node_id
        self._slots = slots
        self._count = len(slots)
        self._optional = set(optional)
        self._limit = limit
        self._pending: dict[int, list[deque[Any]]] = {}
        self.sticky: dict[str, Any] = {}

    def is_optional(self, port: str) -> bool:
        return port in self._optional

    def add(self, slot: int, sequence: int, value: Any) -> dict[str, Any] | None:
        queues = self._pending.get(sequence)
        if queues is None:
            if len(self._pending) >= self._limit:
                raise LimitExceeded(
                    f"node '{self._node_id}': {len(self._pending)} sequences are waiting for "
                    "values on its other inputs (a branch dropped or renumbered chunks?); "
                    f"the join buffer holds {self._limit}")
            queues = self._pending[sequence] = [deque() for _ in range(self._count)]
        queues[slot].append(value)
        if not all(queues):
            return None
        inputs: dict[str, Any] = dict(self.sticky)
        for index, info in enumerate(self._slots):
            got = queues[index].popleft()
            if info.many:
                inputs.setdefault(info.port, []).append(got)
            else:
                inputs[info.port] = got
        if not any(queues):
            del self._pending[sequence]
        return inputs

    def leftover(self) -> int:
        return sum(max(len(q) for q in queues) for queues in self._pending.values())
