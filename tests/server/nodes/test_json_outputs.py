"""Plain dicts, lists and scalars returned for json output ports are sent as JSON, through a real
server, in-process and sandboxed, in unary calls and in streams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

from tensorline.client import AsyncClient, Json, NodeError
from tests.support.manifests import one_node

MODULE = "tests.nodes.json_nodes"


@pytest.fixture
async def json_client(server_factory: Callable[..., Any]) -> AsyncIterator[AsyncClient]:
    server = await server_factory(node_modules=[MODULE])
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        yield client

async def run(client: AsyncClient, node_type: str, runtime: str) -> Any:
    result = await client.execute(one_node(node_type, runtime_hint=runtime),
                                  {"n": np.arange(4, dtype=np.float32)})
    assert result.metrics.nodes[0].runtime == runtime, result.metrics.nodes[0]
    return result


@pytest.mark.parametrize("runtime", ["inprocess", "sandbox"])
@pytest.mark.parametrize(("node_type", "expected"), [
    ("Summary", {"mean": 1.5, "shape": [4]}),
    ("Listing", [0, 1, 2, 3]),
    ("NamedLikeItsPort", {"out": 4}),
    ("ExplicitPort", {"n": 4}),
])
async def test_plain_values_on_a_json_port(json_client: AsyncClient, runtime: str,
                                           node_type: str, expected: Any) -> None:
    result = await run(json_client, node_type, runtime)
    assert result["n"] == Json(expected)


@pytest.mark.parametrize("runtime", ["inprocess", "sandbox"])
async def test_a_dict_among_several_ports(json_client: AsyncClient, runtime: str) -> None:
    result = await run(json_client, "StatsAndDouble", runtime)
    assert result["n:stats"] == Json({"n": 4, "ok": True})
    np.testing.assert_array_equal(result["n:doubled"], [0, 2, 4, 6])


async def test_a_dict_json_cannot_carry_is_the_node_error(json_client: AsyncClient) -> None:
    with pytest.raises(NodeError) as caught:
        await run(json_client, "NotJson", "inprocess")
    assert caught.value.node_id == "n"
    assert "output 'out' cannot be sent" in caught.value.message


async def test_a_streaming_node_yields_dicts(json_client: AsyncClient) -> None:
    async with json_client.stream(one_node("Counts", runtime_hint="inprocess")) as s:
        for size in (3, 5):
            await s.send("n", np.zeros(size, dtype=np.float32))
        await s.close()
        values = [out.value async for out in s]
    assert values == [Json({"sequence": 0, "total": 3}), Json({"sequence": 1, "total": 8})]
