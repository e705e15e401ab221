"""The gRPC surface: server info, catalogue, health, reflection, request ids."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from tensorline.client import AsyncClient, Client
from tensorline.server import __version__


async def test_server_info(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(instance_id="replica-7", max_message_bytes=123_456_789,
                                  max_tensor_bytes=99_999)
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        info = await client.server_info()
    assert info.server_version == __version__
    assert info.protocol_version == "v1"
    assert info.instance_id == "replica-7"
    assert info.max_message_bytes == 123_456_789
    assert info.max_tensor_bytes == 99_999
    assert list(info.runtimes) == ["inprocess", "sandbox"]
    layers = {layer.name for layer in info.sandbox_layers}
    assert {"process", "rlimits", "seccomp"} <= layers


async def test_catalogue_has_test_nodes_with_ports_and_schemas(client: AsyncClient) -> None:
    import json

    nodes = {n.node_type: n for n in await client.list_nodes()}
    split = nodes["Split"]
    assert split.module == "tests.nodes.basic"
    assert [(p.name, p.kind) for p in split.outputs] == [("first", "tensor"),
                                                         ("second", "tensor")]
    assert nodes["CountingModel"].reusable is True
    assert nodes["Split"].reusable is False
    slow_schema = json.loads(nodes["SlowAsync"].params_schema_json)
    assert slow_schema["properties"]["seconds"]["minimum"] == 0
    optional = {p.name: p.required for p in nodes["OptionalBias"].inputs}
    assert optional == {"x": True, "bias": False}
    assert nodes["Fail"].description == "Raise ValueError(message) from process."


async def test_health_and_blocking_client(target: str) -> None:
    async with AsyncClient(target) as client:
        assert await client.health() == "SERVING"
        assert await client.health("tensorline.v1.PipelineService") == "SERVING"

    def blocking() -> tuple[str, int, Any]:
        with Client(target) as client:
            result = client.execute({"version": "v1", "nodes": [
                {"id": "s", "node_type": "Scale", "params": {"factor": 4}}]}, {"s": np.ones(2)})
            return client.health(), len(client.list_nodes()), result["s"]

    status, count, scaled = await asyncio.to_thread(blocking)
    assert status == "SERVING"
    assert count >= 8
    np.testing.assert_array_equal(scaled, [4.0, 4.0])


async def reflected_services(target: str) -> set[str]:
    """The service names the server at ``target`` lists through gRPC reflection."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def requests() -> Any:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names: set[str] = set()
        async for response in stub.ServerReflectionInfo(requests()):
            names |= {s.name for s in response.list_services_response.service}
    return names


async def test_reflection_lists_the_services(target: str) -> None:
    assert {"tensorline.v1.PipelineService", "grpc.health.v1.Health"} <= \
        await reflected_services(target)


async def test_requests_and_chunks_of_one_size_with_other_layouts_are_told_apart(
        client: AsyncClient) -> None:
    """Requests (and stream chunks) of the same byte size but another manifest, node id or
    dtype, interleaved call after call: every answer is the one its own request asks for (the
    codec's layout caches decode repeated requests without parsing them)."""
    manifests = [{"nodes": [{"id": node, "node_type": "Scale", "params": {"factor": factor}}]}
                 for node, factor in (("a", 2.0), ("b", 2.0), ("a", 3.0))]
    arrays = [np.arange(8, dtype=np.float32), np.arange(8, dtype=np.int32)]
    for _ in range(6):
        for manifest in manifests:
            node = manifest["nodes"][0]["id"]
            factor = manifest["nodes"][0]["params"]["factor"]
            for array in arrays:
                result = await client.execute(manifest, {node: array})
                assert result[node].dtype == (np.float32 if array.dtype == np.float32
                                              else np.float64 if factor % 1 else np.int32)
                np.testing.assert_array_equal(result[node], array * factor)
    streams = [client.stream({"nodes": [{"id": node, "node_type": "PassThrough"}]})
               for node in ("a", "b")]
    async with streams[0] as first, streams[1] as second:
        for index in range(20):
            for session, node in ((first, "a"), (second, "b")):
                array = arrays[index % 2] + index
                await session.send(node, array)
                out = await session.__anext__()
                assert (out.node_id, out.sequence, out.value.dtype) == (node, index, array.dtype)
                np.testing.assert_array_equal(out.value, array)
