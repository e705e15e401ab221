"""Load shedding and graceful drain of unary calls on a real server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from tensorline.client import AsyncClient, LimitExceededError, TransportError
from tests.nodes import basic
from tests.support.polling import eventually

SLOW = {"nodes": [{"id": "slow", "node_type": "SlowAsync", "params": {"seconds": 0.5}}]}


async def test_calls_beyond_the_limit_are_shed_with_a_retry_hint(
        server_factory: Callable[..., Any]) -> None:
    server = await server_factory(max_concurrent_executions=1)
    basic.EVENTS.pop("slow", None)
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        first = asyncio.ensure_future(client.execute(SLOW, {"slow": np.ones(1)}))
        await eventually(lambda: "process" in basic.EVENTS.get("slow", []))
        with pytest.raises(LimitExceededError) as info:
            await client.execute({"nodes": [{"id": "p", "node_type": "PassThrough"}]},
                                 {"p": np.ones(1)})
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
        assert "limit 1" in info.value.message
        result = await first
        np.testing.assert_array_equal(result["slow"], np.ones(1))


async def test_drain_finishes_in_flight_calls_and_refuses_new_ones(
        server_factory: Callable[..., Any]) -> None:
    server = await server_factory(grace_s=10.0)
    basic.EVENTS.pop("slow", None)
    target = f"127.0.0.1:{server.port}"
    async with AsyncClient(target) as client:
        in_flight = asyncio.ensure_future(client.execute(SLOW, {"slow": np.arange(3)}))
        await eventually(lambda: "process" in basic.EVENTS.get("slow", []))
        stopping = asyncio.ensure_future(server.stop())
        await eventually(lambda: server.draining)
        result = await in_flight
        np.testing.assert_array_equal(result["slow"], np.arange(3))
        await stopping
    async with AsyncClient(target, retry_unavailable=False, timeout=5) as late:
        with pytest.raises(TransportError):
            await late.server_info()
    assert basic.EVENTS["slow"][-1] == "cleanup"


async def test_drain_with_100_streams_in_flight_loses_none(
        server_factory: Callable[..., Any]) -> None:
    """SIGTERM-style drain while 100 sessions are open: each one keeps sending, closes and gets
    every result plus its metrics; a session opened after the drain began is refused."""
    server = await server_factory(grace_s=30.0, max_concurrent_streams=0)
    manifest = {"nodes": [{"id": "scale", "node_type": "Scale", "params": {"factor": 2}}]}
    target = f"127.0.0.1:{server.port}"
    async with AsyncClient(target, retry_unavailable=False) as client:
        streams = [client.stream(manifest) for _ in range(100)]
        for stream in streams:
            await stream.__aenter__()
        for index, stream in enumerate(streams):
            await stream.send("scale", np.full(4, index, dtype=np.float32))
        stopping = asyncio.ensure_future(server.stop())
        await eventually(lambda: server.service.admission.draining)
        with pytest.raises(TransportError):
            async with client.stream(manifest) as late:
                await late.send("scale", np.ones(1))
                await late.close()

        async def finish(index: int, stream: Any) -> list[Any]:
            await stream.send("scale", np.full(4, index + 1000, dtype=np.float32))
            metrics = await stream.close()
            outputs = [out async for out in stream]
            await stream.__aexit__(None, None, None)
            assert metrics is not None
            return outputs

        results = await asyncio.gather(*(finish(i, s) for i, s in enumerate(streams)))
        for index, outputs in enumerate(results):
            values = [out.value for out in outputs]
            assert len(values) == 2, f"stream {index} lost results"
            np.testing.assert_array_equal(values[0], np.full(4, 2 * index, dtype=np.float32))
            np.testing.assert_array_equal(values[1], np.full(4, 2 * (index + 1000),
                                                             dtype=np.float32))
        await stopping
