"""The client stream API: AsyncClient.stream and the blocking Client.stream."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from tensorline.client import AsyncClient, Client, NodeError, StreamEvent, TensorlineError
from tests.nodes import streaming as nodes

COUNTER = {"nodes": [{"id": "c", "node_type": "Counter"}]}
TRACKER = {"nodes": [{"id": "t", "node_type": "Tracker"}]}


def scalar(value: float) -> np.ndarray:
    return np.array([value], dtype=np.float32)


async def test_sequences_count_up_and_can_be_chosen(client: AsyncClient) -> None:
    async with client.stream(COUNTER) as s:
        assert await s.send("c", scalar(0)) == 0
        assert await s.send("c:in", scalar(0)) == 1  # "node:port" addressing
        assert await s.send("c", scalar(0), sequence=10) == 10
        assert await s.send("c", scalar(0)) == 11
        await s.close()
        outputs = [o async for o in s]
    assert [o.sequence for o in outputs] == [0, 1, 10, 11, -1]


async def test_events_reach_the_callback_before_ready(client: AsyncClient) -> None:
    seen: list[StreamEvent] = []
    async with client.stream(COUNTER, on_event=seen.append) as s:
        assert [e.kind for e in seen] == ["initializing", "ready"]
        assert s.events == seen
        assert s.session_id and [n.node_id for n in s.nodes] == ["c"]


async def test_leaving_the_block_normally_closes(client: AsyncClient) -> None:
    async with client.stream(TRACKER) as s:
        await s.send("t", scalar(1))
    assert s.metrics is not None and s.metrics.chunks_received == 1
    assert nodes.SESSIONS[s.session_id] == ["initialize", "flushed", "cleanup"]


async def test_leaving_the_block_with_an_exception_cancels(client: AsyncClient) -> None:
    with pytest.raises(KeyError):
        async with client.stream(TRACKER) as s:
            await s.send("t", scalar(1))
            raise KeyError("user code failed")
    assert s.metrics is None
    events = await asyncio.to_thread(nodes.wait_for_cleanup, s.session_id)
    assert "flushed" not in events and events[-1] == "cleanup"


async def test_send_after_close_raises(client: AsyncClient) -> None:
    async with client.stream(COUNTER) as s:
        await s.close()
        with pytest.raises(TensorlineError):
            await s.send("c", scalar(1))


async def test_send_after_a_node_error_raises_the_node_error(client: AsyncClient) -> None:
    manifest = {"nodes": [{"id": "f", "node_type": "FailAt", "params": {"sequence": 0}}]}
    with pytest.raises(NodeError) as caught:
        async with client.stream(manifest) as s:
            await s.send("f", scalar(0))
            async for _ in s:
                pass
    assert caught.value.node_id == "f"
    with pytest.raises(NodeError):
        await s.send("f", scalar(1))


def run_sync(target: str, manifest: dict[str, Any], count: int) -> tuple[list[int], Any]:
    with Client(target) as client, client.stream(manifest) as s:
        for i in range(count):
            s.send("c", scalar(i))
        metrics = s.close()
        return [int(o.value) for o in s], metrics


async def test_blocking_client_stream(target: str) -> None:
    counts, metrics = await asyncio.to_thread(run_sync, target, COUNTER, 4)
    assert counts == [1, 2, 3, 4, 4]
    assert metrics.chunks_received == 4 and metrics.results_sent == 5


def sync_cancel(target: str) -> str:
    with Client(target) as client:
        try:
            with client.stream(TRACKER) as s:
                s.send("t", scalar(1))
                raise RuntimeError("stop")
        except RuntimeError:
            pass
        return s.session_id


async def test_blocking_client_stream_cancels_on_error(target: str) -> None:
    session = await asyncio.to_thread(sync_cancel, target)
    events = await asyncio.to_thread(nodes.wait_for_cleanup, session)
    assert "flushed" not in events and events[-1] == "cleanup"


async def test_bounded_buffer_is_lifted_by_close(client: AsyncClient) -> None:
    manifest = {"nodes": [{"id": "p", "node_type": "PassThrough"}]}
    async with client.stream(manifest, max_buffered=2) as s:
        for i in range(20):  # nobody reads: the reader stops at 2 buffered results
            await s.send("p", scalar(i))
        metrics = await s.close()
        values = [float(o.value[0]) async for o in s]
    assert metrics.results_sent == 20 and values == [float(i) for i in range(20)]
