"""Property test of the DAG executor: random acyclic pipelines of Scale/Add nodes compute what a
plain Python evaluation of the same graph computes, and every sink comes back."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorline.server.executor import PipelineEngine
from tensorline.server.nodes import NodeRegistry
from tensorline.wire import PortItem

REGISTRY = NodeRegistry.default(entry_points=False)


@st.composite
def pipelines(draw: st.DrawFn) -> tuple[dict[str, Any], list[PortItem], dict[str, np.ndarray]]:
    count = draw(st.integers(min_value=1, max_value=9))
    nodes: list[dict[str, Any]] = []
    connections: list[dict[str, str]] = []
    inputs: list[PortItem] = []
    values: dict[str, np.ndarray] = {}
    consumed: set[str] = set()
    for index in range(count):
        node_id = f"n{index}"
        earlier = [f"n{i}" for i in range(index)]
        if draw(st.booleans()):
            factor = draw(st.integers(min_value=-3, max_value=3))
            nodes.append({"id": node_id, "node_type": "Scale", "params": {"factor": factor}})
            if earlier and draw(st.booleans()):
                source = draw(st.sampled_from(earlier))
                connections.append({"from": source, "to": node_id})
                consumed.add(source)
                x = values[source]
            else:
                x = np.full(3, float(draw(st.integers(-5, 5))))
                inputs.append(PortItem(node_id, "", x))
            values[node_id] = x * factor
        else:
            nodes.append({"id": node_id, "node_type": "Add"})
            sources = draw(st.lists(st.sampled_from(earlier), max_size=3)) if earlier else []
            if sources:
                for source in sources:
                    connections.append({"from": source, "to": node_id})
                    consumed.add(source)
                terms = [values[s] for s in sources]
            else:
                terms = [np.full(3, float(draw(st.integers(-5, 5))))
                         for _ in range(draw(st.integers(1, 3)))]
                inputs += [PortItem(node_id, "in", t) for t in terms]
            values[node_id] = sum(terms[1:], terms[0])
    sinks = {n["id"]: values[n["id"]] for n in nodes if n["id"] not in consumed}
    manifest = {"version": "v1", "nodes": nodes, "connections": connections}
    return manifest, inputs, sinks


@settings(max_examples=60, deadline=None, derandomize=True)
@given(case=pipelines())
def test_random_pipelines_compute_the_reference_result(
        case: tuple[dict[str, Any], list[PortItem], dict[str, np.ndarray]]) -> None:
    manifest, inputs, expected = case

    async def run() -> dict[str, Any]:
        engine = PipelineEngine.local(REGISTRY)
        await engine.start()
        try:
            result, cached = await engine.execute(json.dumps(manifest), inputs)
        finally:
            await engine.shutdown()
        assert cached is False
        assert {r.node_id for r in result.reports} == {n["id"] for n in manifest["nodes"]}
        return {item.node_id: item.value for item in result.outputs}

    outputs = asyncio.run(run())
    assert set(outputs) == set(expected)
    for node_id, value in expected.items():
        np.testing.assert_array_equal(outputs[node_id], value, err_msg=node_id)
