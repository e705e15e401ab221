"""The sandbox through the real service: mixed pipelines bit-exact, and an escape/crash suite of
untrusted nodes while the server keeps serving other requests; afterwards the server is healthy
and no stray worker process or /dev/shm segment remains."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tensorline.client import AsyncClient, DeadlineExceededError, SandboxError
from tensorline.server import TensorlineServer
from tests.server.conftest import UNTRUSTED

MIXED = {"nodes": [
    {"id": "a", "node_type": "PassThrough", "runtime_hint": "inprocess"},
    {"id": "b", "node_type": "PassThrough", "runtime_hint": "sandbox"},
    {"id": "c", "node_type": "Reshape", "params": {"shape": [-1]}, "runtime_hint": "inprocess"},
], "connections": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}]}


@pytest.mark.parametrize(("dtype", "size"), [
    ("float32", 1), ("int16", 1000), ("complex128", 4096), ("uint8", 3 << 20),
    ("float64", 64 << 20 >> 3), ("bool", 0),
])
async def test_mixed_pipeline_is_bit_exact(sandboxed: tuple[TensorlineServer, AsyncClient],
                                           dtype: str, size: int) -> None:
    _, client = sandboxed
    rng = np.random.default_rng(size)
    array = (rng.integers(0, 255, size) if dtype in ("uint8", "int16", "bool")
             else rng.standard_normal(size)).astype(dtype).reshape(-1, 1) if size else (
        np.zeros((0, 1), dtype=dtype))
    result = await client.execute(MIXED, {"a": array})
    out = result["c"]
    assert out.dtype == array.dtype
    assert out.tobytes() == array.tobytes()
    assert [m.runtime for m in result.metrics.nodes] == ["inprocess", "sandbox", "inprocess"]


async def check_still_serving(client: AsyncClient) -> None:
    """A trusted sandboxed request and an untrusted well-behaved one both succeed."""
    x = np.arange(5.0)
    result = await client.execute({"nodes": [{"id": "e", "node_type": "Echo"}]}, {"e": x})
    np.testing.assert_array_equal(result["e"], x)
    assert result.metrics.nodes[0].runtime == "sandbox"


def one(node_type: str, **params: Any) -> dict[str, Any]:
    return {"nodes": [{"id": "bad", "node_type": node_type, "params": params}]}


async def expect_sandbox_error(client: AsyncClient, manifest: dict[str, Any],
                               *fragments: str) -> SandboxError:
    bystander = asyncio.ensure_future(check_still_serving(client))
    with pytest.raises(SandboxError) as info:
        await client.execute(manifest, {"bad": np.ones(2)}, timeout=60)
    await bystander
    error = info.value
    assert error.code == grpc.StatusCode.ABORTED
    assert error.node_id == "bad"
    assert "node 'bad'" in error.message
    for fragment in fragments:
        assert fragment in error.message, error.message
    await check_still_serving(client)
    return error


async def test_escape_and_crash_suite(sandboxed: tuple[TensorlineServer, AsyncClient],
                                      tmp_path: Path) -> None:
    server, client = sandboxed
    layers = {layer.name for layer in (await client.server_info()).sandbox_layers if layer.active}
    assert {"seccomp", "landlock", "rlimits"} <= layers, layers

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        await expect_sandbox_error(client, one("TcpConnect", port=listener.getsockname()[1]),
                                   "blocked by the sandbox")
        with pytest.raises(BlockingIOError):
            listener.accept()

    outside = tmp_path.parent / "escaped.txt"
    await expect_sandbox_error(client, one("WriteOutside", path=str(outside)),
                               "blocked by the sandbox")
    assert not outside.exists()
    await expect_sandbox_error(client, one("Shell"), "blocked by the sandbox")
    await expect_sandbox_error(client, one("ForkBomb"), "blocked by the sandbox")
    import os

    await expect_sandbox_error(client, one("SignalPid", pid=os.getpid()), "blocked by the sandbox")
    from multiprocessing import shared_memory

    segment = shared_memory.SharedMemory(create=True, size=4096)
    try:
        await expect_sandbox_error(client, one("OpenFile", path=f"/dev/shm/{segment.name}"),
                                   "blocked by the sandbox")
    finally:
        segment.close()
        segment.unlink()

    await expect_sandbox_error(client, one("Segfault"), "signal 11")
    await expect_sandbox_error(client, one("MemoryHog"), "memory limit")
    await expect_sandbox_error(client, one("CpuLoop"), "CPU time limit")
    with pytest.raises(DeadlineExceededError):
        await client.execute(one("Sleeper"), {"bad": np.ones(1)}, timeout=1.5)
    await check_still_serving(client)

    assert await client.health() == "SERVING"
    stats = server.engine.runtimes["sandbox"].stats()
    assert stats["worker_restarts"] >= 1


@pytest.mark.parametrize("enabled", [True, False])
async def test_fallback_only_for_sandbox_caused_failures(
        server_factory: Callable[..., Any], leak_check: None, enabled: bool) -> None:
    """Trusted nodes: a blocked syscall while initializing falls back in-process (when enabled);
    a crash of the node's own process() and the node's own exceptions never do."""
    server = await server_factory(node_modules=["tests.nodes.basic", UNTRUSTED],
                                  enable_fallback=enabled)
    async with AsyncClient(f"127.0.0.1:{server.port}", retry_unavailable=False) as client:
        blocked = {"nodes": [{"id": "bad", "node_type": "BlockedInit", "runtime_hint": "sandbox"}]}
        if enabled:
            result = await client.execute(blocked, {"bad": np.ones(2)})
            metrics = result.metrics.nodes[0]
            assert metrics.runtime == "inprocess"
            assert metrics.selection_reason.startswith("fallback from sandbox")
            assert "blocked by the sandbox" in metrics.fallback
        else:
            with pytest.raises(SandboxError, match="blocked by the sandbox"):
                await client.execute(blocked, {"bad": np.ones(2)})
        crash = {"nodes": [{"id": "bad", "node_type": "Segfault", "runtime_hint": "sandbox"}]}
        with pytest.raises(SandboxError, match="signal 11"):
            await client.execute(crash, {"bad": np.ones(2)})
        from tensorline.client import NodeError

        own = {"nodes": [{"id": "bad", "node_type": "Fail", "runtime_hint": "sandbox"}]}
        with pytest.raises(NodeError, match="boom"):
            await client.execute(own, {"bad": np.ones(2)})
