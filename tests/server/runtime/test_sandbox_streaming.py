"""Streaming sessions with sandboxed nodes: ordinary nodes run once per chunk in a worker
(``NodeInstance.process``); a streaming node needs ``NodeInstance.stream``, which the sandbox
runtime does not implement yet, so it is refused at initialization with a clear message."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from tensorline.server import RequestInvalid
from tensorline.server.executor import PipelineEngine, SessionClosed, StreamItem
from tensorline.server.nodes import NodeRegistry
from tensorline.server.runtime import InProcessRuntime, SandboxRuntime
from tensorline.server.selector import Selector
from tests.server.runtime.conftest import TEST_NODES


@pytest.fixture
async def engine(sandbox: SandboxRuntime) -> AsyncIterator[PipelineEngine]:
    registry = NodeRegistry.default(modules=["tests.nodes.streaming"],
                                    untrusted_modules=[TEST_NODES], entry_points=False)
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


async def test_a_streaming_node_in_the_sandbox_is_refused_clearly(engine: PipelineEngine) -> None:
    manifest = {"nodes": [{"id": "c", "node_type": "Counter", "runtime_hint": "cpython_wasm"}]}
    plan = engine.plan_for(json.dumps(manifest)).plan
    assert plan.nodes["c"].decision.runtime == "sandbox"
    session = engine.streaming.open(plan)
    try:
        with pytest.raises(RequestInvalid) as caught:
            await session.start()
    finally:
        await session.aclose()
    assert "cannot run streaming nodes" in caught.value.message
