"""Streaming test nodes: the reference cardinality set (Expander 1->N, Filter 1->0/1, Counter
stateful) plus slow, failing, sync-generator and lifecycle-tracking nodes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import numpy as np
from pydantic import Field

from tensorline.server.nodes import Chunk, Node, NodeParams, Port, StreamingNode

# execution (session) id -> lifecycle events, for cleanup assertions.
SESSIONS: dict[str, list[str]] = {}
SESSIONS_LOCK = threading.Lock()
CLEANUPS = threading.Condition(SESSIONS_LOCK)


def _record(session: str, event: str) -> None:
    with CLEANUPS:
        SESSIONS.setdefault(session, []).append(event)
        CLEANUPS.notify_all()


def wait_for_cleanup(session: str, timeout: float = 10.0) -> list[str]:
    """Block until the session's Tracker ran its cleanup (or the timeout passes)."""
    with CLEANUPS:
        CLEANUPS.wait_for(lambda: "cleanup" in SESSIONS.get(session, []), timeout)
        return list(SESSIONS.get(session, []))


class ExpanderParams(NodeParams):
    copies: int = Field(3, ge=0)


class Expander(StreamingNode):
    """1 -> N: yield ``copies`` values per chunk (the input plus 0, 1, 2...)."""

    Params = ExpanderParams
    params: ExpanderParams
    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("out", kind="tensor"),)

    async def stream(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Any]:
        async for chunk in chunks:
            for index in range(self.params.copies):
                yield chunk.value + index


class Filter(StreamingNode):
    """1 -> 0/1: pass chunks whose first element is even, drop the others."""

    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("out", kind="tensor"),)

    async def stream(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Any]:
        async for chunk in chunks:
            if int(chunk.value.reshape(-1)[0]) % 2 == 0:
                yield chunk.value


class Counter(StreamingNode):
    """Stateful: the running count of chunks seen in this session; flushes the total at the end
    on port 'total'. State is in ``self``: every session has its own instance."""

    inputs = (Port("in"),)
    outputs = (Port("count", kind="tensor"), Port("total", kind="tensor"))

    def initialize(self) -> None:
        self.count = 0

    async def stream(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Any]:
        async for _ in chunks:
            self.count += 1
            yield {"count": np.asarray(self.count)}
        yield {"total": np.asarray(self.count)}


class SyncCounter(StreamingNode):
    """Like Counter, as a sync generator (runs in its own thread)."""

    inputs = (Port("in"),)
    outputs = (Port("count", kind="tensor"), Port("total", kind="tensor"))

    def stream(self, chunks: Iterator[Chunk]) -> Iterator[Any]:
        count = 0
        for _ in chunks:
            count += 1
            yield {"count": np.asarray(count)}
        yield {"total": np.asarray(count)}


class SlowParams(NodeParams):
    seconds: float = Field(0.0005, ge=0)


class SlowPass(Node):
    """A deliberately slow identity (async sleep per chunk) for backpressure tests."""

    Params = SlowParams
    params: SlowParams

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        await asyncio.sleep(self.params.seconds)
        return inputs["in"]


class SometimesSlow(Node):
    """Identity that suspends (a loop iteration) on every third value and returns at once on the
    others: in a stream, its producer finishes some calls and hands the others to its stage."""

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        value = inputs["in"]
        if int(np.asarray(value).reshape(-1)[0]) % 3 == 0:
            await asyncio.sleep(0)
        return value


class Blocker(Node):
    """Identity that, on a value of -1, records "blocked" for its session and waits until its
    call is cancelled (then records "cancelled")."""

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        value = inputs["in"]
        if int(np.asarray(value).reshape(-1)[0]) == -1:
            _record(self.context.execution_id, "blocked")
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                _record(self.context.execution_id, "cancelled")
                raise
        return value


class FailAtParams(NodeParams):
    sequence: int = 3


class FailAt(Node):
    """Identity that raises RuntimeError on the chunk with the given sequence number (the value's
    first element)."""

    Params = FailAtParams
    params: FailAtParams

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        value = inputs["in"]
        if int(np.asarray(value).reshape(-1)[0]) == self.params.sequence:
            raise RuntimeError(f"cannot handle {self.params.sequence}")
        return value


class BrokenModel(Node):
    """Fails while initializing (a model that cannot load)."""

    def initialize(self) -> None:
        raise OSError("model file not found")

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        return inputs["in"]


class Tracker(StreamingNode):
    """Identity that records initialize/cleanup per session, and blocks on a chunk whose value
    is negative until cancelled (to test cancel and disconnect mid-work)."""

    inputs = (Port("in"),)
    outputs = (Port("out"),)

    async def initialize(self) -> None:
        _record(self.context.execution_id, "initialize")

    async def stream(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Any]:
        async for chunk in chunks:
            value = chunk.value
            if isinstance(value, np.ndarray) and value.size and value.reshape(-1)[0] < 0:
                _record(self.context.execution_id, "blocked")
                await asyncio.Event().wait()
            yield value
        _record(self.context.execution_id, "flushed")

    async def cleanup(self) -> None:
        _record(self.context.execution_id, "cleanup")


class Pair(Node):
    """Joins ports 'a' and 'b' (by sequence) into a 2-row tensor."""

    inputs = (Port("a", kind="tensor"), Port("b", kind="tensor"))
    outputs = (Port("out", kind="tensor"),)

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        return np.stack([inputs["a"], inputs["b"]])


class LoadingModel(Node):
    """Reports model-loading progress from a sync initialize (a worker thread)."""

    def initialize(self) -> None:
        for step in (1, 2, 3):
            self.context.report(f"loading shard {step}/3", progress=step / 3, kind="loading")

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        return inputs["in"]


class Gain(Node):
    """'in' times the optional 'gain' (default 1): the client sets 'gain' now and then."""

    inputs = (Port("in", kind="tensor"), Port("gain", kind="tensor", required=False))
    outputs = (Port("out", kind="tensor"),)

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        return inputs["in"] * inputs.get("gain", 1)


class SyncTracker(StreamingNode):
    """A sync generator (own thread) that records, per session, when its thread leaves the
    generator and when cleanup runs: cancel must unblock a thread waiting for input."""

    inputs = (Port("in"),)
    outputs = (Port("out"),)

    def stream(self, chunks: Iterator[Chunk]) -> Iterator[Any]:
        try:
            for chunk in chunks:
                _record(self.context.execution_id, "chunk")
                yield chunk.value
        finally:
            _record(self.context.execution_id, "generator-exit")

    def cleanup(self) -> None:
        _record(self.context.execution_id, "cleanup")
