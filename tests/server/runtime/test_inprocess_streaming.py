"""InProcessInstance.stream: the runtime side of streaming nodes (the contract a sandbox runtime
implements too): outputs in order as yielded, node errors as NodeFailed, prompt stop on aclose,
sync generators in a thread of their own."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tensorline.server import NodeFailed
from tensorline.server.manifest import compile_manifest
from tensorline.server.nodes import Chunk, NodeRegistry, Port, StreamingNode
from tensorline.server.runtime import ExecutionScope, InProcessRuntime
from tensorline.server.selector import Selector


class Doubler(StreamingNode):
    inputs = (Port("in"),)
    outputs = (Port("out"),)

    async def stream(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Any]:
        async for chunk in chunks:
            yield chunk.value
            yield chunk.value


class SyncDoubler(StreamingNode):
    inputs = (Port("in"),)
    outputs = (Port("out"),)
    threads: set[str] = set()

    def stream(self, chunks: Iterator[Chunk]) -> Iterator[Any]:
        type(self).threads.add(threading.current_thread().name)
        for chunk in chunks:
            if chunk.value == "boom":
                raise ValueError("sync boom")
            yield chunk.value
            yield chunk.value


class AsyncBoom(StreamingNode):
    inputs = (Port("in"),)
    outputs = (Port("out"),)

    async def stream(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Any]:
        async for _ in chunks:
            raise KeyError("async boom")
        yield None  # pragma: no cover - makes this an async generator


class NotAGenerator(StreamingNode):
    inputs = (Port("in"),)
    outputs = (Port("out"),)

    def stream(self, chunks: Any) -> Any:
        return [1, 2]


async def instance_of(node_type: type[StreamingNode], runtime: InProcessRuntime) -> Any:
    registry = NodeRegistry()
    registry.register(node_type)
    plan = compile_manifest({"nodes": [{"id": "n", "node_type": node_type.node_type}]},
                            registry, Selector())
    return await runtime.acquire(plan.nodes["n"], ExecutionScope("exec"))


async def feed(values: list[Any], taken: list[int] | None = None) -> AsyncIterator[Chunk]:
    for index, value in enumerate(values):
        if taken is not None:
            taken.append(index)
        yield Chunk(index, {"in": value})


@pytest.fixture
async def runtime() -> AsyncIterator[InProcessRuntime]:
    rt = InProcessRuntime(threads=2)
    yield rt
    await rt.shutdown()


@pytest.mark.parametrize("node", [Doubler, SyncDoubler])
async def test_outputs_in_order_as_yielded(runtime: InProcessRuntime,
                                           node: type[StreamingNode]) -> None:
    instance = await instance_of(node, runtime)
    assert instance.can_stream
    outputs = [out async for out in instance.stream(feed(["a", "b", "c"]))]
    assert outputs == ["a", "a", "b", "b", "c", "c"]
    await runtime.release(instance)


async def test_sync_generators_run_in_their_own_thread(runtime: InProcessRuntime) -> None:
    instance = await instance_of(SyncDoubler, runtime)
    assert [out async for out in instance.stream(feed([1]))] == [1, 1]
    assert all(name.startswith("tensorline-stream-") for name in SyncDoubler.threads)
    await runtime.release(instance)


@pytest.mark.parametrize(("node", "exc_type"), [(AsyncBoom, "KeyError"),
                                                (SyncDoubler, "ValueError"),
                                                (NotAGenerator, "TypeError")])
async def test_node_errors_become_node_failed(runtime: InProcessRuntime,
                                              node: type[StreamingNode], exc_type: str) -> None:
    instance = await instance_of(node, runtime)
    with pytest.raises(NodeFailed) as caught:
        async for _ in instance.stream(feed(["boom"])):
            pass
    assert caught.value.node_id == "n" and caught.value.exc_type == exc_type
    await runtime.release(instance)


@pytest.mark.parametrize("node", [Doubler, SyncDoubler])
async def test_the_generator_runs_at_most_one_output_ahead(runtime: InProcessRuntime,
                                                           node: type[StreamingNode]) -> None:
    instance = await instance_of(node, runtime)
    taken: list[int] = []
    outputs = instance.stream(feed(list(range(100)), taken))
    assert await outputs.__anext__() == 0
    await asyncio.sleep(0)  # let a thread-backed generator run if it could
    assert len(taken) <= 2  # pulled chunk 0 and at most the next one
    await outputs.aclose()
    if node is SyncDoubler:  # the thread was told to stop, and it does
        assert instance.node.context.cancelled.is_set()
        await asyncio.gather(*(asyncio.wrap_future(f) for f in list(instance.running)))
        assert not instance.running
    await runtime.release(instance)
