"""Test nodes for running sync nodes on the event loop or in the thread pool: nodes that are
fast, then block on a gate the test opens, recording the thread each call ran in."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from tensorline.server.nodes import Node, NodeParams, NodeTraits

# Gate name -> (entered, release): the node sets ``entered`` and waits for ``release``.
_GATES: dict[str, tuple[threading.Event, threading.Event]] = {}
# Node type -> what its next calls do: "fast", "slow" (sleep past any inline bound) or "gate".
MODE: dict[str, str] = {}
# Node type -> names of the threads its calls ran in, in order.
THREADS: dict[str, list[str]] = {}
_LOCK = threading.Lock()
# How long a "slow" call sleeps: far past the inline bound the tests use (INLINE_BOUND_MS).
SLOW_S = 0.25
# The tests' inline bound: high enough that a fast call on a loaded machine (preempted for a few
# milliseconds) does not count as slow, far below SLOW_S.
INLINE_BOUND_MS = 50.0
# A gate the test never opens must not hang the server's shutdown for long.
GATE_LIMIT_S = 30.0


def gate(name: str) -> tuple[threading.Event, threading.Event]:
    with _LOCK:
        return _GATES.setdefault(name, (threading.Event(), threading.Event()))


def reset() -> None:
    with _LOCK:
        for _, release in _GATES.values():
            release.set()
        _GATES.clear()
        MODE.clear()
        THREADS.clear()


class GateParams(NodeParams):
    gate: str = ""


class _Paced(Node):
    Params = GateParams
    params: GateParams

    def process(self, inputs: Mapping[str, Any]) -> Any:
        with _LOCK:
            THREADS.setdefault(self.node_type, []).append(threading.current_thread().name)
        mode = MODE.get(self.node_type, "fast")
        if mode == "slow":
            time.sleep(SLOW_S)
        elif mode == "gate":
            entered, release = gate(self.params.gate)
            entered.set()
            release.wait(GATE_LIMIT_S)
        return inputs["in"]


class PacedMeasured(_Paced):
    """Sync, duration unknown: the runtime measures it."""


class PacedShort(_Paced):
    """Sync, declared short: on the event loop from its first call."""

    traits = NodeTraits(blocking=False)


class PacedBlocking(_Paced):
    """Sync, declared blocking: always in the thread pool."""

    traits = NodeTraits(blocking=True)
