"""Big tensors and message/tensor limits, through a real server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from tensorline.client import AsyncClient, Client, LimitExceededError

MiB = 1024 * 1024
PASS = {"version": "v1", "nodes": [{"id": "p", "node_type": "PassThrough"}]}


async def test_64_mib_tensor_round_trips_with_default_limits(
        server_factory: Callable[..., Any]) -> None:
    server = await server_factory()  # default max_message_bytes / max_tensor_bytes
    big = np.arange(16 * MiB, dtype=np.float32)
    assert big.nbytes == 64 * MiB
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        info = await client.server_info()
        assert info.max_message_bytes > 64 * MiB
        assert info.max_tensor_bytes >= 64 * MiB
        result = await client.execute(PASS, {"p": big})
    out = result["p"]
    assert out.dtype == np.float32
    assert out.shape == big.shape
    assert np.array_equal(out, big)


async def test_tensor_over_configured_limit_is_resource_exhausted(
        server_factory: Callable[..., Any]) -> None:
    server = await server_factory(max_tensor_bytes=1024)
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        info = await client.server_info()
        assert info.max_tensor_bytes == 1024
        ok = await client.execute(PASS, {"p": np.zeros(256, dtype=np.float32)})  # exactly 1024
        assert ok["p"].nbytes == 1024
        with pytest.raises(LimitExceededError) as caught:
            await client.execute(PASS, {"p": np.zeros(257, dtype=np.float32)})
    error = caught.value
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [v.field for v in error.violations] == ["inputs[0].value.tensor.data"]
    assert "1028 bytes exceeds the server limit of 1024" in error.violations[0].description
    assert error.message.startswith("request exceeds limits")


async def test_server_message_limit_rejects_big_request(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(max_message_bytes=1 * MiB)
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        small = await client.execute(PASS, {"p": np.zeros(1000, dtype=np.uint8)})
        assert small["p"].shape == (1000,)
        with pytest.raises(LimitExceededError) as caught:
            await client.execute(PASS, {"p": np.zeros(2 * MiB, dtype=np.uint8)})
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in caught.value.message


async def test_client_message_limit_rejects_big_send_and_receive(
        server_factory: Callable[..., Any]) -> None:
    server = await server_factory()
    target = f"127.0.0.1:{server.port}"
    grow = {"version": "v1", "nodes": [
        {"id": "wide", "node_type": "Cast", "params": {"dtype": "float64"}}]}
    async with AsyncClient(target, max_message_bytes=1 * MiB) as client:
        with pytest.raises(LimitExceededError) as sent:
            await client.execute(PASS, {"p": np.zeros(2 * MiB, dtype=np.uint8)})
        assert "larger than max" in sent.value.message
        # 512 KiB of int8 in, 4 MiB of float64 out: over the client's receive limit.
        with pytest.raises(LimitExceededError) as received:
            await client.execute(grow, {"wide": np.zeros(512 * 1024, dtype=np.int8)})
        assert "larger than max" in received.value.message
        assert received.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_blocking_client_honours_its_message_limit(server_factory: Callable[..., Any]) -> None:
    server = await server_factory()
    import asyncio

    def call() -> None:
        with Client(f"127.0.0.1:{server.port}", max_message_bytes=64 * 1024) as client:
            client.execute(PASS, {"p": np.zeros(128 * 1024, dtype=np.uint8)})

    with pytest.raises(LimitExceededError, match="larger than max"):
        await asyncio.to_thread(call)
