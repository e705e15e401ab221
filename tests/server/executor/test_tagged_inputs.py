"""A request input's ``Tagged`` metadata reaches the node the same way in a unary call and in a
stream: with the value on an "any" port, stripped on a typed port. Through a real server, with
the node in-process and sandboxed."""

from __future__ import annotations

import numpy as np
import pytest

from tensorline.client import AsyncClient, Tagged
from tests.support.manifests import one_node

RUNTIMES = ["inprocess", "sandbox"]


def manifest(node_type: str, runtime: str) -> dict[str, object]:
    return one_node(node_type, {"factor": 2} if node_type == "Scale" else None, runtime)


async def streamed(client: AsyncClient, node_type: str, runtime: str, values: list[object]) -> list[object]:
    async with client.stream(manifest(node_type, runtime)) as session:
        for value in values:
            await session.send("n", value)
        await session.close()
        return [out.value async for out in session]


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_an_any_port_receives_the_metadata_unary_and_streamed(
        client: AsyncClient, runtime: str) -> None:
    # PassThrough's input is an "any" port: it returns what it received, metadata included.
    sent = Tagged(np.arange(3.0), {"unit": "m", "source": "probe"})
    unary = (await client.execute(manifest("PassThrough", runtime), {"n": sent}))["n"]
    outputs = await streamed(client, "PassThrough", runtime,
                             [sent, Tagged(np.arange(2.0), {"unit": "s"})])
    for got, expected in ((unary, sent), (outputs[0], sent),
                          (outputs[1], Tagged(np.arange(2.0), {"unit": "s"}))):
        assert isinstance(got, Tagged), got
        assert got.metadata == expected.metadata
        np.testing.assert_array_equal(got.value, expected.value)


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_a_typed_port_receives_the_bare_value_unary_and_streamed(
        client: AsyncClient, runtime: str) -> None:
    # Scale's input is a tensor port: the node sees (and so returns) a plain array.
    sent = Tagged(np.arange(3.0), {"unit": "m"})
    unary = (await client.execute(manifest("Scale", runtime), {"n": sent}))["n"]
    (streamed_out,) = await streamed(client, "Scale", runtime, [sent])
    for got in (unary, streamed_out):
        assert not isinstance(got, Tagged), got
        np.testing.assert_array_equal(got, np.arange(3.0) * 2)
