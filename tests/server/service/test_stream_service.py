"""StreamPipeline at the service boundary: auth on the streaming call, stream admission, and
when a reader writes its results itself."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from tensorline.client import AsyncClient, AuthenticationError, LimitExceededError, NodeError
from tensorline.server.service._stream import DIRECT_WRITE_AFTER_S, _Reads

MANIFEST = {"nodes": [{"id": "p", "node_type": "PassThrough"}]}


async def test_token_required_on_streams(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(auth_tokens=["alpha"])
    target = f"127.0.0.1:{server.port}"
    async with AsyncClient(target) as anonymous:
        with pytest.raises(AuthenticationError) as info:
            async with anonymous.stream(MANIFEST):
                pass
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    async with AsyncClient(target, token="alpha") as client, client.stream(MANIFEST) as s:
        await s.send("p", np.arange(3))
        metrics = await s.close()
        assert [o.value.tolist() async for o in s] == [[0, 1, 2]]
    assert metrics.chunks_received == 1


async def test_streams_beyond_the_limit_are_shed(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(max_concurrent_streams=1)
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        async with client.stream(MANIFEST):
            with pytest.raises(LimitExceededError) as info:
                async with client.stream(MANIFEST):
                    pass
            assert info.value.retry_after_s is not None
        async with client.stream(MANIFEST) as again:  # the slot is free once the first closed
            await again.close()


async def test_stream_metrics_are_exported(server_factory: Callable[..., Any]) -> None:
    from tests.server.service.test_observability import scrape

    server = await server_factory(metrics_port=0, metrics_host="127.0.0.1")
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        async with client.stream(MANIFEST) as s:
            await s.send("p", np.arange(3))
        with pytest.raises(NodeError):
            async with client.stream({"nodes": [{"id": "f", "node_type": "Fail"}]}) as s:
                await s.send("f", np.arange(3))
                async for _ in s:
                    pass
    samples = await asyncio.to_thread(scrape, server.metrics_port)
    assert samples[("tensorline_requests_total",
                    (("code", "OK"), ("method", "StreamPipeline")))] == 1
    assert samples[("tensorline_requests_total",
                    (("code", "UNKNOWN"), ("method", "StreamPipeline")))] == 1
    assert samples[("tensorline_node_executions_total",
                    (("node_type", "PassThrough"), ("runtime", "inprocess")))] == 1
    assert samples[("tensorline_node_errors_total",
                    (("node_type", "Fail"), ("runtime", "inprocess")))] == 1
    assert samples[("tensorline_inflight_streams", ())] == 0


def test_a_read_right_after_another_sessions_is_not_taken_for_a_waiting_client() -> None:
    """The reader writes results itself only when its read waited for its client; a chunk of
    another session read just before means the loop was busy with that session instead."""
    reads, one, two = _Reads(), object(), object()
    assert not reads.after_other(1.0, one)
    # The same session's own chunks never count, however close.
    assert not reads.after_other(1.0 + DIRECT_WRITE_AFTER_S / 10, one)
    assert reads.after_other(1.0 + DIRECT_WRITE_AFTER_S / 5, two)
    assert reads.after_other(1.0 + DIRECT_WRITE_AFTER_S / 2, one)
    # Long enough after the other session's last chunk: the loop had nothing else to do.
    assert not reads.after_other(1.0 + DIRECT_WRITE_AFTER_S * 3, two)
