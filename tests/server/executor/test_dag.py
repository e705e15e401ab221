"""DAG execution through a real server: fan-out/fan-in, sinks, concurrency, zero-copy sharing."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import numpy as np

from tensorline.client import AsyncClient, PortItem, Tagged
from tests.nodes import spine


def node(node_id: str, node_type: str, **extra: Any) -> dict[str, Any]:
    return {"id": node_id, "node_type": node_type, **extra}


def edge(src: str, dst: str, **ports: str) -> dict[str, str]:
    return {"from": src, "to": dst, **ports}


async def test_fan_out_fan_in_returns_every_sink(client: AsyncClient) -> None:
    """src -> split -> (first: scale x2, second: scale x10) -> concat; plus side sinks."""
    manifest = {
        "version": "v1",
        "metadata": {"name": "diamond"},
        "nodes": [
            node("src", "PassThrough"),
            node("split", "Split"),
            node("double", "Scale", params={"factor": 2}),
            node("tenfold", "Scale", params={"factor": 10}),
            node("join", "Concat"),
            node("sum", "Add"),
            node("tap", "PassThrough"),
        ],
        "connections": [
            edge("src", "split"),
            edge("split", "double", from_port="first"),
            edge("split", "tenfold", from_port="second"),
            edge("double", "join", to_port="a"),
            edge("tenfold", "join", to_port="b"),
            edge("double", "sum"),
            edge("tenfold", "sum"),
            edge("src", "tap"),
        ],
    }
    x = np.arange(8, dtype=np.float32)
    result = await client.execute(manifest, {"src": x})
    assert set(result.outputs) == {"join", "sum", "tap"}
    np.testing.assert_array_equal(result["join"], np.concatenate([x[:4] * 2, x[4:] * 10]))
    np.testing.assert_array_equal(result["sum"], x[:4] * 2 + x[4:] * 10)
    np.testing.assert_array_equal(result["tap"], x)
    assert {m.node_id for m in result.metrics.nodes} == {
        "src", "split", "double", "tenfold", "join", "sum", "tap"}
    for metrics in result.metrics.nodes:
        assert metrics.runtime == "inprocess"
        assert metrics.selection_reason
        assert metrics.wall_ms >= 0


async def test_multi_port_sinks_are_keyed_node_colon_port(client: AsyncClient) -> None:
    manifest = {"version": "v1", "nodes": [node("t", "Triple"), node("s", "Split")]}
    x = np.arange(4, dtype=np.int64)
    result = await client.execute(manifest, {"t": x, "s": x})
    assert set(result.outputs) == {"t:x", "t:twice", "t:thrice", "s:first", "s:second"}
    np.testing.assert_array_equal(result["t:thrice"], x * 3)
    np.testing.assert_array_equal(result["s:second"], x[2:])
    assert {(i.node_id, i.port) for i in result.items} == {
        ("t", "x"), ("t", "twice"), ("t", "thrice"), ("s", "first"), ("s", "second")}


async def test_partially_consumed_multi_port_node_returns_the_rest(client: AsyncClient) -> None:
    manifest = {"version": "v1",
                "nodes": [node("t", "Triple"), node("neg", "Scale", params={"factor": -1})],
                "connections": [edge("t", "neg", from_port="twice")]}
    result = await client.execute(manifest, {"t": np.ones(2)})
    assert set(result.outputs) == {"t:x", "t:thrice", "neg"}
    np.testing.assert_array_equal(result["neg"], -2 * np.ones(2))


async def test_every_source_input_is_used(client: AsyncClient) -> None:
    manifest = {
        "version": "v1",
        "nodes": [node("a", "PassThrough"), node("b", "PassThrough"), node("c", "PassThrough"),
                  node("sum", "Add"), node("cat", "Concat"), node("bias", "OptionalBias")],
        "connections": [edge("a", "sum"), edge("b", "sum"), edge("c", "sum")],
    }
    inputs = [
        PortItem("a", "", np.array([1.0])),
        PortItem("b", "", np.array([10.0])),
        PortItem("c", "in", np.array([100.0])),
        PortItem("cat", "a", np.array([1, 2])),
        PortItem("cat", "b", np.array([3])),
        PortItem("bias", "x", np.array([1.0, 2.0])),
        PortItem("bias", "bias", np.array([0.5, 0.5])),
    ]
    result = await client.execute(manifest, inputs)
    np.testing.assert_array_equal(result["sum"], [111.0])
    np.testing.assert_array_equal(result["cat"], [1, 2, 3])
    np.testing.assert_array_equal(result["bias"], [1.5, 2.5])


async def test_optional_input_may_be_left_out(client: AsyncClient) -> None:
    manifest = {"version": "v1", "nodes": [node("bias", "OptionalBias")]}
    result = await client.execute(manifest, {"bias:x": np.array([1.0, 2.0])})
    np.testing.assert_array_equal(result["bias"], [1.0, 2.0])


async def test_add_takes_n_request_inputs_on_its_many_port(client: AsyncClient) -> None:
    manifest = {"version": "v1", "nodes": [node("sum", "Add")]}
    items = [PortItem("sum", "in", np.full(3, float(i))) for i in range(1, 6)]
    result = await client.execute(manifest, items)
    np.testing.assert_array_equal(result["sum"], np.full(3, 15.0))


async def test_independent_branches_run_concurrently(client: AsyncClient) -> None:
    """Each branch waits for the other's event: this completes only if both run at once."""
    left, right = f"left-{uuid.uuid4().hex}", f"right-{uuid.uuid4().hex}"
    manifest = {
        "version": "v1",
        "nodes": [
            node("src", "PassThrough"),
            node("l", "Rendezvous", params={"name": left, "wait_for": right}),
            node("r", "Rendezvous", params={"name": right, "wait_for": left}),
            node("sum", "Add"),
        ],
        "connections": [edge("src", "l"), edge("src", "r"), edge("l", "sum"), edge("r", "sum")],
    }
    result = await client.execute(manifest, {"src": np.ones(2)}, timeout=20)
    np.testing.assert_array_equal(result["sum"], [2.0, 2.0])


async def test_fan_out_shares_one_array_without_copying(client: AsyncClient) -> None:
    ids = [f"probe{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    manifest = {
        "version": "v1",
        "nodes": [node("src", "PassThrough"), *(node(i, "Probe") for i in ids)],
        "connections": [edge("src", i) for i in ids],
    }
    x = np.arange(1024, dtype=np.float64)
    result = await client.execute(manifest, {"src": x})
    seen = [spine.SEEN.pop(i) for i in ids]
    assert all(s is seen[0] for s in seen), "fan-out must hand the same object to every consumer"
    # The array is a read-only view over the request buffer: not even the decoder copied it.
    assert not seen[0].flags.writeable
    assert not seen[0].flags.owndata
    for i in ids:
        np.testing.assert_array_equal(result[i], x)


async def test_sync_nodes_run_off_the_event_loop(client: AsyncClient) -> None:
    node_id = f"sync-{uuid.uuid4().hex[:6]}"
    manifest = {"version": "v1", "nodes": [node(node_id, "SyncProbe")]}
    await client.execute(manifest, {node_id: np.zeros(1)})
    thread_name = spine.SEEN.pop(node_id)
    assert thread_name != threading.main_thread().name
    assert thread_name.startswith("tensorline-node")


async def test_metadata_kept_by_any_port_and_stripped_for_typed_port(client: AsyncClient) -> None:
    manifest = {"version": "v1",
                "nodes": [node("keep", "PassThrough"), node("tap", "PassThrough"),
                          node("scale", "Scale", params={"factor": 3})],
                "connections": [edge("keep", "scale"), edge("keep", "tap")]}
    result = await client.execute(manifest, {"keep": Tagged(np.arange(3), {"unit": "m"})})
    assert result["tap"] == Tagged(result["tap"].value, {"unit": "m"})
    np.testing.assert_array_equal(result["scale"], np.arange(3) * 3)


async def test_python_scalar_on_tensor_port_becomes_0d_array(client: AsyncClient) -> None:
    manifest = {"version": "v1", "nodes": [node("f", "FloatOut")]}
    result = await client.execute(manifest, {"f": np.arange(4.0)})
    assert result["f"].shape == ()
    assert float(result["f"]) == 6.0


async def test_json_manifest_text_and_yaml_text_are_accepted(client: AsyncClient) -> None:
    yaml_text = "version: v1\nnodes:\n  - id: s\n    node_type: Scale\n    params: {factor: 2}\n"
    result = await client.execute(yaml_text, {"s": np.ones(2)})
    np.testing.assert_array_equal(result["s"], [2.0, 2.0])
    json_text = '{"version": "v1", "nodes": [{"id": "s", "node_type": "Scale"}]}'
    result = await client.execute(json_text, {"s": np.ones(2)})
    np.testing.assert_array_equal(result["s"], [1.0, 1.0])


async def test_sync_branches_run_in_parallel_threads(client: AsyncClient) -> None:
    """Three sync nodes meet at one thread barrier: only possible if all run at the same time."""
    name = f"barrier-{uuid.uuid4().hex}"
    branches = ["x", "y", "z"]
    manifest = {
        "version": "v1",
        "nodes": [node("src", "PassThrough"),
                  *(node(b, "SyncRendezvous", params={"name": name, "parties": 3})
                    for b in branches)],
        "connections": [edge("src", b) for b in branches],
    }
    result = await client.execute(manifest, {"src": np.arange(2)}, timeout=30)
    assert set(result.outputs) == set(branches)


async def test_non_contiguous_and_big_endian_node_outputs(client: AsyncClient) -> None:
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    result = await client.execute({"version": "v1", "nodes": [node("v", "Views")]}, {"v": x})
    np.testing.assert_array_equal(result["v:strided"], x[:, ::2])
    np.testing.assert_array_equal(result["v:transposed"], x.T)
    np.testing.assert_array_equal(result["v:bigendian"], x)
    assert result["v:bigendian"].dtype == np.dtype("<i4")
    assert result["v:scalar"].shape == ()
    assert int(result["v:scalar"]) == 0


async def test_concurrent_requests_do_not_mix(client: AsyncClient) -> None:
    import asyncio

    manifest = {
        "version": "v1",
        "nodes": [node("split", "Split"), node("a", "Scale", params={"factor": 2}),
                  node("b", "SyncProbe"), node("join", "Concat")],
        "connections": [edge("split", "a", from_port="first"),
                        edge("split", "b", from_port="second"),
                        edge("a", "join", to_port="a"), edge("b", "join", to_port="b")],
    }
    arrays = [np.full(4, float(i)) for i in range(40)]
    results = await asyncio.gather(*(client.execute(manifest, {"split": x}) for x in arrays))
    for x, result in zip(arrays, results, strict=True):
        np.testing.assert_array_equal(result["join"], [x[0] * 2] * 2 + [x[0]] * 2)
    spine.SEEN.pop("b", None)
