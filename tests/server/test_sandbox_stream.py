"""StreamPipeline with sandboxed nodes through the real service: ordinary sandboxed nodes run
once per chunk in a worker next to in-process and streaming nodes; a streaming node cannot be
sandboxed yet (refused before Ready); a worker crash mid-stream ends the session with a sandbox
error naming the node while the server keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorline.client import AsyncClient, InvalidRequestError, SandboxError
from tensorline.server import TensorlineServer
from tests.server.runtime.conftest import shm_segments, stray_processes, wait_until

UNTRUSTED = "tests.server.runtime.sandbox_nodes"

MIXED = {"nodes": [
    {"id": "a", "node_type": "PassThrough", "runtime_hint": "inprocess"},
    {"id": "b", "node_type": "Scale", "params": {"factor": 2}, "runtime_hint": "sandbox"},
    {"id": "c", "node_type": "Counter"},
], "connections": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}]}


@pytest.fixture(scope="module")
def leak_check() -> Iterator[None]:
    before = shm_segments()
    yield
    wait_until(lambda: not stray_processes(), 10.0, "worker processes to exit")
    assert shm_segments() - before == set()


@pytest.fixture
async def sandboxed(server_factory: Callable[..., Any], leak_check: None,
                    tmp_path: Path) -> AsyncIterator[tuple[TensorlineServer, AsyncClient]]:
    server = await server_factory(untrusted_modules=[UNTRUSTED], sandbox_workers=2,
                                  sandbox_cpu_seconds=2.0, sandbox_scratch_dir=tmp_path)
    async with AsyncClient(f"127.0.0.1:{server.port}", retry_unavailable=False) as client:
        yield server, client


async def test_sandboxed_node_in_a_stream(sandboxed: tuple[TensorlineServer, AsyncClient]) -> None:
    _, client = sandboxed
    async with client.stream(MIXED) as s:
        assert {n.node_id: n.runtime for n in s.nodes} == {"a": "inprocess", "b": "sandbox",
                                                         "c": "inprocess"}
        for i in range(20):
            await s.send("a", np.full(4, float(i)))
        metrics = await s.close()
        outputs = [(o.port, o.sequence, int(o.value)) async for o in s]
    assert outputs == [("count", i, i + 1) for i in range(20)] + [("total", -1, 20)]
    assert {n.node_id: n.inputs_consumed for n in metrics.nodes} == {"a": 20, "b": 20, "c": 20}


async def test_big_chunks_through_a_sandboxed_node(
        sandboxed: tuple[TensorlineServer, AsyncClient]) -> None:
    _, client = sandboxed
    manifest = {"nodes": [{"id": "b", "node_type": "PassThrough", "runtime_hint": "sandbox"}]}
    big = np.random.default_rng(0).standard_normal(2 << 20)  # 16 MiB
    async with client.stream(manifest) as s:
        await s.send("b", big)
        await s.send("b", big[::-1].copy())
        first, second = await s.__anext__(), await s.__anext__()
        await s.close()
    assert np.array_equal(first.value, big) and np.array_equal(second.value, big[::-1])


async def test_streaming_node_cannot_be_sandboxed_yet(
        sandboxed: tuple[TensorlineServer, AsyncClient]) -> None:
    _, client = sandboxed
    manifest = {"nodes": [{"id": "c", "node_type": "Counter", "runtime_hint": "sandbox"}]}
    with pytest.raises(InvalidRequestError) as caught:
        async with client.stream(manifest):
            pass
    assert "cannot run streaming nodes" in caught.value.message


async def test_worker_crash_mid_stream(sandboxed: tuple[TensorlineServer, AsyncClient]) -> None:
    _, client = sandboxed
    manifest = {"nodes": [{"id": "p", "node_type": "PassThrough"},
                          {"id": "boom", "node_type": "Segfault"}],
                "connections": [{"from": "p", "to": "boom"}]}
    with pytest.raises(SandboxError) as caught:
        async with client.stream(manifest) as s:
            await s.send("p", np.zeros(3))
            async for _ in s:
                pass
    assert caught.value.node_id == "boom"
    assert caught.value.metadata["during"] == "process of sequence 0"
    # The server still streams.
    async with client.stream(MIXED) as s:
        await s.send("a", np.ones(2))
        assert (await s.close()).chunks_received == 1
