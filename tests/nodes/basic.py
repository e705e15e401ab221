"""Test nodes: failures, slowness, cleanup tracking and multi-port outputs."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import Field

from tensorline.server.nodes import Node, NodeParams, Port

# node id -> events observed (initialize / process / cleanup), for lifecycle assertions.
EVENTS: dict[str, list[str]] = {}
EVENTS_LOCK = threading.Lock()
CLEANED = threading.Event()


def record(node_id: str, event: str) -> None:
    with EVENTS_LOCK:
        EVENTS.setdefault(node_id, []).append(event)


class FailParams(NodeParams):
    message: str = "boom"


class Fail(Node):
    """Raise ValueError(message) from process."""

    Params = FailParams
    params: FailParams

    def process(self, inputs: Mapping[str, Any]) -> Any:
        raise ValueError(self.params.message)


class SlowParams(NodeParams):
    seconds: float = Field(10.0, ge=0)


class SlowAsync(Node):
    """Sleep (async), tracking lifecycle events by node id; returns the input."""

    Params = SlowParams
    params: SlowParams

    async def initialize(self) -> None:
        record(self.context.node_id, "initialize")

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        record(self.context.node_id, "process")
        await asyncio.sleep(self.params.seconds)
        return inputs["in"]

    async def cleanup(self) -> None:
        record(self.context.node_id, "cleanup")


class SlowSync(Node):
    """Busy-wait in a thread until done or cancelled (cooperative), tracking lifecycle events."""

    Params = SlowParams
    params: SlowParams

    def process(self, inputs: Mapping[str, Any]) -> Any:
        record(self.context.node_id, "process")
        end = time.monotonic() + self.params.seconds
        while time.monotonic() < end and not self.context.cancelled.is_set():
            time.sleep(0.01)
        return inputs["in"]

    def cleanup(self) -> None:
        record(self.context.node_id, "cleanup")


class Split(Node):
    """Split a tensor in two halves along axis 0: outputs 'first' and 'second'."""

    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("first", kind="tensor"), Port("second", kind="tensor"))

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        array = inputs["in"]
        half = array.shape[0] // 2
        return {"first": array[:half], "second": array[half:]}


class Concat(Node):
    """Concatenate named inputs 'a' and 'b' along axis 0 (fan-in with named ports)."""

    inputs = (Port("a", kind="tensor"), Port("b", kind="tensor"))
    outputs = (Port("out", kind="tensor"),)

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        return np.concatenate([inputs["a"], inputs["b"]])


class CountingModel(Node):
    """A reusable node that counts its initializations (a stand-in for loading a model)."""

    reusable = True
    initializations = 0

    def initialize(self) -> None:
        type(self).initializations += 1

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        return np.asarray(type(self).initializations)
