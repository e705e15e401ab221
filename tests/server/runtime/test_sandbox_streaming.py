"""Streaming sessions with sandboxed nodes: ordinary nodes run once per chunk in a worker
(``NodeInstance.process``); a streaming node's generator runs in a worker
(``NodeInstance.stream``), with the same results as in-process, backpressure, cancellation and
crash handling."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from tensorline.server._errors import LimitExceeded, NodeFailed
from tensorline.server.executor import PipelineEngine, SessionClosed, StreamItem
from tensorline.server.nodes import Chunk, Emit, Node, NodeRegistry
from tensorline.server.runtime import ExecutionScope, InProcessRuntime, SandboxRuntime
from tensorline.server.runtime.sandbox import WorkerFailure
from tensorline.server.selector import Selector
from tests.server.runtime import sandbox_nodes
from tests.server.runtime.conftest import TEST_NODES, make_spec
from tests.support.polling import eventually


@pytest.fixture
async def engine(sandbox: SandboxRuntime) -> AsyncIterator[PipelineEngine]:
    registry = NodeRegistry.default(modules=["tests.nodes.streaming"], entry_points=False)
    # In-process on purpose (the tests use the classes too); a server describes it in a worker.
    registry.load_module(TEST_NODES, trusted=False)
    inprocess = InProcessRuntime()
    yield PipelineEngine(registry, Selector(sandbox_available=True),
                         {"inprocess": inprocess, "sandbox": sandbox})
    await inprocess.shutdown()


async def drain(session: Any) -> tuple[list[StreamItem], SessionClosed]:
    results: list[StreamItem] = []
    while True:
        for item in await session.outbox.get_batch():
            if isinstance(item, StreamItem):
                results.append(item)
            elif isinstance(item, SessionClosed):
                return results, item


async def test_sandboxed_ordinary_nodes_process_every_chunk(engine: PipelineEngine) -> None:
    manifest = {"nodes": [{"id": "boxed", "node_type": "AsyncDouble"},
                          {"id": "count", "node_type": "Counter"}],
                "connections": [{"from": "boxed", "to": "count", "to_port": "in"}]}
    plan = engine.plan_for(json.dumps(manifest)).plan
    assert plan.nodes["boxed"].decision.runtime == "sandbox"
    session = engine.streaming.open(plan)
    try:
        reports = await session.start()
        assert [r.runtime for r in reports] == ["sandbox", "inprocess"]
        runner = asyncio.ensure_future(session.run())
        for i in range(5):
            await session.send(i, "boxed", "", np.full(3, float(i)))
        session.end_input()
        results, closed = await drain(session)
        await runner
    finally:
        await session.aclose()
    assert [(r.port, r.sequence, int(r.value)) for r in results] == [
        ("count", i, i + 1) for i in range(5)] + [("total", -1, 5)]
    assert closed.reports[0].inputs_consumed == 5


async def run_session(engine: PipelineEngine, manifest: dict[str, Any],
                      values: list[Any]) -> tuple[list[str], list[tuple[str, int, Any]]]:
    plan = engine.plan_for(json.dumps(manifest)).plan
    session = engine.streaming.open(plan)
    first = manifest["nodes"][0]["id"]
    try:
        reports = await session.start()
        runner = asyncio.ensure_future(session.run())
        for i, value in enumerate(values):
            await session.send(i, first, "", value)
        session.end_input()
        results, _ = await drain(session)
        await runner
    finally:
        await session.aclose()
    return ([r.runtime for r in reports],
            [(r.port, r.sequence, np.asarray(r.value).tolist()) for r in results])


@pytest.mark.parametrize("node_type", ["Counter", "SyncCounter", "Expander", "Filter"])
async def test_a_streaming_node_runs_in_the_sandbox(engine: PipelineEngine,
                                                    node_type: str) -> None:
    values = [np.full(3, float(i)) for i in range(6)]
    boxed = {"nodes": [{"id": "c", "node_type": node_type, "runtime_hint": "cpython_wasm"}]}
    local = {"nodes": [{"id": "c", "node_type": node_type, "runtime_hint": "inprocess"}]}
    runtimes, sandboxed = await run_session(engine, boxed, values)
    assert runtimes == ["sandbox"]
    reference_runtimes, reference = await run_session(engine, local, values)
    assert reference_runtimes == ["inprocess"]
    assert sandboxed == reference and sandboxed


# --- the runtime directly -----------------------------------------------------------------------


async def chunks_of(values: list[Any], error: BaseException | None = None,
                    ) -> AsyncIterator[Chunk]:
    for i, value in enumerate(values):
        yield Chunk(i, {"in": value})
    if error is not None:
        raise error


async def stream_all(sandbox: SandboxRuntime, cls: type[Node], values: list[Any],
                     scope: ExecutionScope | None = None) -> list[Any]:
    instance = await sandbox.acquire(make_spec(cls), scope or ExecutionScope("s1"))
    try:
        return [out async for out in instance.stream(chunks_of(values))]
    finally:
        await sandbox.release(instance)


async def test_arrays_outlive_their_message_and_events_arrive(sandbox: SandboxRuntime) -> None:
    rng = np.random.default_rng(1)
    # Large (segment) and small (inline) arrays, of several dtypes, bit-exact.
    values = [rng.standard_normal(1 << 17), np.arange(5, dtype=np.int16),
              rng.integers(0, 255, (512, 513), dtype=np.uint8), np.asfortranarray(
                  rng.standard_normal((300, 200)).astype(np.float32))]
    events: list[tuple[str, str, str, float]] = []
    scope = ExecutionScope("s-events", extra={"on_event": lambda *e: events.append(e)})
    outputs = await stream_all(sandbox, sandbox_nodes.StreamHold, values, scope)
    assert [type(o) for o in outputs] == [Emit] * len(values)
    assert [o.sequence for o in outputs] == list(range(len(values)))
    for out, value in zip(outputs, values, strict=True):
        assert out.value.dtype == value.dtype and out.value.shape == value.shape
        assert out.value.tobytes("A") == value.tobytes("A")
    assert events == [("n1", "progress", f"chunk {i}", 0.5) for i in range(len(values))]


async def test_node_exception_is_node_failed(sandbox: SandboxRuntime) -> None:
    instance = await sandbox.acquire(make_spec(sandbox_nodes.StreamFail),
                                     ExecutionScope("s-fail"))
    outputs: list[Any] = []
    try:
        with pytest.raises(NodeFailed) as caught:
            async for out in instance.stream(chunks_of([np.ones(2), np.ones(2), -np.ones(2)])):
                outputs.append(out)
    finally:
        await sandbox.release(instance)
    assert len(outputs) == 2
    assert caught.value.exc_type == "ValueError" and "negative input at 2" in caught.value.detail
    # The worker lives on and serves the next stream.
    assert len(await stream_all(sandbox, sandbox_nodes.StreamFail, [np.ones(2)])) == 1


async def test_errors_of_the_chunks_pass_through(sandbox: SandboxRuntime) -> None:
    overflow = LimitExceeded("join overflow")
    instance = await sandbox.acquire(make_spec(sandbox_nodes.StreamHold),
                                     ExecutionScope("s-overflow"))
    try:
        with pytest.raises(LimitExceeded) as caught:
            async for _ in instance.stream(chunks_of([np.ones(2)], overflow)):
                pass
    finally:
        await sandbox.release(instance)
    assert caught.value is overflow
    assert len(await stream_all(sandbox, sandbox_nodes.StreamHold, [np.ones(2)])) == 1


async def test_worker_crash_mid_stream_is_a_worker_failure(sandbox: SandboxRuntime) -> None:
    instance = await sandbox.acquire(make_spec(sandbox_nodes.StreamCrash),
                                     ExecutionScope("s-crash"))
    outputs: list[Any] = []
    try:
        with pytest.raises(WorkerFailure) as caught:
            async for out in instance.stream(chunks_of([np.ones(2), -np.ones(2)])):
                outputs.append(out)
    finally:
        await sandbox.release(instance)
    assert len(outputs) == 1
    assert caught.value.node_id == "n1" and caught.value.kind == "crash"
    assert caught.value.during == "process" and "SIGSEGV" in caught.value.cause
    assert len(await stream_all(sandbox, sandbox_nodes.StreamCrash, [np.ones(2)])) == 1


def marks(worker_dir: str, execution_id: str) -> set[str]:
    return {name.split("-", 1)[0] for name in os.listdir(worker_dir)
            if name.endswith(f"-{execution_id}")}


@pytest.mark.parametrize("cls", [sandbox_nodes.SyncStreamBlock, sandbox_nodes.AsyncStreamBlock])
@pytest.mark.parametrize("where", ["waiting-for-input", "blocked-in-node", "cancelled-task"])
async def test_stopping_a_stream_early(sandbox: SandboxRuntime, cls: type[Node],
                                       where: str) -> None:
    """aclose (or cancelling the consumer) while the worker waits for the next message, or
    while the node is busy: the generator is closed, cleanup runs, the worker lives on."""
    execution = f"stop-{cls.__name__}-{where}"
    instance = await sandbox.acquire(make_spec(cls), ExecutionScope(execution))
    feed: asyncio.Queue[Any] = asyncio.Queue()

    async def chunks() -> AsyncIterator[Chunk]:
        sequence = 0
        while True:
            yield Chunk(sequence, {"in": await feed.get()})
            sequence += 1

    outputs = instance.stream(chunks())
    await feed.put(np.ones(2))
    assert float((await outputs.__anext__())[0]) == 1.0
    worker = instance.worker  # type: ignore[attr-defined]
    pid = worker.pid
    if where == "waiting-for-input":
        await outputs.aclose()  # type: ignore[attr-defined]
    else:
        await feed.put(-np.ones(2))
        consumer = asyncio.ensure_future(outputs.__anext__())
        await eventually(lambda: "blocked" in marks(worker.scratch_view, execution))
        if where == "cancelled-task":
            consumer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await consumer
        else:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
            await outputs.aclose()  # type: ignore[attr-defined]
    await sandbox.release(instance)
    await eventually(lambda: marks(worker.scratch_view, execution) >= {"closed", "cleanup"},
                     what="generator closed and cleanup run")
    assert worker.alive and worker.pid == pid
    # The worker is free again.
    assert len(await stream_all(sandbox, cls, [np.ones(2)])) == 1
