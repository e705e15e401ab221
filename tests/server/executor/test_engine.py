"""The engine without the gRPC layer: server-side deadlines and plan lookups."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from tensorline.server import DeadlineExceeded, RequestInvalid
from tensorline.server.executor import PipelineEngine
from tensorline.server.nodes import NodeRegistry
from tensorline.server.runtime import ExecutionScope
from tensorline.wire import PortItem, Violation
from tests.nodes.basic import EVENTS, EVENTS_LOCK


@pytest.fixture
async def engine() -> AsyncIterator[PipelineEngine]:
    registry = NodeRegistry.default(modules=["tests.nodes.basic", "tests.nodes.spine"],
                                    entry_points=False)
    engine = PipelineEngine.local(registry)
    await engine.start()
    yield engine
    await engine.shutdown()


def scope_with_deadline(seconds: float) -> ExecutionScope:
    return ExecutionScope(uuid.uuid4().hex, deadline=asyncio.get_running_loop().time() + seconds)


def manifest(nodes: list[dict[str, Any]], connections: list[dict[str, Any]] | None = None) -> str:
    return json.dumps({"version": "v1", "nodes": nodes, "connections": connections or []})


async def test_deadline_names_the_node_running_inline(engine: PipelineEngine) -> None:
    slow = f"slow-{uuid.uuid4().hex[:6]}"
    text = manifest([{"id": "p", "node_type": "PassThrough"},
                     {"id": slow, "node_type": "SlowAsync", "params": {"seconds": 60}}],
                    [{"from": "p", "to": slow}])
    with pytest.raises(DeadlineExceeded) as caught:
        await engine.execute(text, [PortItem("p", "", np.zeros(1))],
                             scope=scope_with_deadline(0.5))
    assert caught.value.message == f"deadline exceeded while running node(s) {slow}"
    # The executor returns only after the node was released: cleanup already ran.
    with EVENTS_LOCK:
        assert EVENTS[slow] == ["initialize", "process", "cleanup"]


async def test_deadline_names_every_running_branch(engine: PipelineEngine) -> None:
    text = manifest([{"id": "p", "node_type": "PassThrough"},
                     {"id": "a", "node_type": "SlowAsync", "params": {"seconds": 60}},
                     {"id": "b", "node_type": "SlowSync", "params": {"seconds": 60}}],
                    [{"from": "p", "to": "a"}, {"from": "p", "to": "b"}])
    with pytest.raises(DeadlineExceeded, match=r"while running node\(s\) a, b$"):
        await engine.execute(text, [PortItem("p", "", np.zeros(1))],
                             scope=scope_with_deadline(0.5))


async def test_plan_lookup_caches_by_manifest_text(engine: PipelineEngine) -> None:
    text = manifest([{"id": "s", "node_type": "Scale"}])
    first, second = engine.plan_for(text), engine.plan_for(text)
    assert (first.cached, second.cached) == (False, True)
    assert first.plan is second.plan
    assert first.plan.sinks == (("s", "out"),)
    assert first.plan.external_inputs == (("s", "in"),)


async def test_codec_violations_join_manifest_problems(engine: PipelineEngine) -> None:
    prior = [Violation("inputs[0].value.tensor.data", "3 bytes but ...")]
    with pytest.raises(RequestInvalid) as caught:
        await engine.execute(manifest([{"id": "s", "node_type": "Nope"}]),
                             [PortItem("s", "", None)], prior=prior)
    assert [v.field for v in caught.value.violations] == [
        "inputs[0].value.tensor.data", "nodes[0].node_type"]
