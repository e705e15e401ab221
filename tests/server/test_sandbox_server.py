"""The sandbox through the real service: mixed pipelines bit-exact, an escape/crash suite of
untrusted nodes while the server keeps serving other requests (afterwards the server is healthy
and no stray worker process or /dev/shm segment remains), and the fallback rules for trusted
nodes: what the sandbox denied or stopped is never re-run in-process; a node the worker cannot
load is, and says so in the metrics, the log and the fallback counter."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest

from tensorline.client import AsyncClient, Client, DeadlineExceededError, TensorlineError
from tensorline.server import TensorlineServer
from tensorline.server.nodes import NodeRegistry
from tests.nodes.server_only import ServerOnlyScale
from tests.server.conftest import UNTRUSTED
from tests.support.manifests import one_node
from tests.support.processes import ServerProcess, free_port, wait_until

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

DENIED = grpc.StatusCode.PERMISSION_DENIED
CAPPED = grpc.StatusCode.RESOURCE_EXHAUSTED
KILLED = grpc.StatusCode.ABORTED


async def expect_sandbox_error(client: AsyncClient, manifest: dict[str, Any],
                               code: grpc.StatusCode, *fragments: str) -> TensorlineError:
    bystander = asyncio.ensure_future(check_still_serving(client))
    with pytest.raises(TensorlineError) as info:
        await client.execute(manifest, {"bad": np.ones(2)}, timeout=60)
    await bystander
    error = info.value
    assert error.code == code, error
    assert error.reason == "SANDBOX_FAILURE"
    assert error.metadata["node_id"] == "bad"
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
        manifest = one_node("TcpConnect", {"port": listener.getsockname()[1]}, node_id="bad")
        await expect_sandbox_error(client, manifest,
                                   DENIED, "blocked by the sandbox")
        with pytest.raises(BlockingIOError):
            listener.accept()

    outside = tmp_path.parent / "escaped.txt"
    await expect_sandbox_error(client, one_node("WriteOutside", {"path": str(outside)}, node_id="bad"),
                               DENIED, "blocked by the sandbox")
    assert not outside.exists()
    await expect_sandbox_error(client, one_node("Shell", node_id="bad"), DENIED, "blocked by the sandbox")
    await expect_sandbox_error(client, one_node("ForkBomb", node_id="bad"), DENIED, "blocked by the sandbox")
    import os

    await expect_sandbox_error(client, one_node("SignalPid", {"pid": os.getpid()}, node_id="bad"), DENIED,
                               "blocked by the sandbox")
    from multiprocessing import shared_memory

    segment = shared_memory.SharedMemory(create=True, size=4096)
    try:
        manifest = one_node("OpenFile", {"path": f"/dev/shm/{segment.name}"}, node_id="bad")
        await expect_sandbox_error(client, manifest, DENIED, "blocked by the sandbox")
    finally:
        segment.close()
        segment.unlink()

    await expect_sandbox_error(client, one_node("Segfault", node_id="bad"), KILLED, "signal 11")
    await expect_sandbox_error(client, one_node("MemoryHog", node_id="bad"), CAPPED, "memory limit")
    await expect_sandbox_error(client, one_node("CpuLoop", node_id="bad"), CAPPED, "CPU time limit")
    with pytest.raises(DeadlineExceededError):
        await client.execute(one_node("Sleeper", node_id="bad"), {"bad": np.ones(1)}, timeout=1.5)
    await check_still_serving(client)

    assert await client.health() == "SERVING"
    stats = server.engine.runtimes["sandbox"].stats()
    assert stats["worker_restarts"] >= 1


# --- trusted nodes: the fallback rules --------------------------------------------------------


def hinted(node_type: str, **params: Any) -> dict[str, Any]:
    """One trusted node ``bad`` that asks for the sandbox."""
    return {"nodes": [{"id": "bad", "node_type": node_type, "params": params,
                       "runtime_hint": "sandbox"}]}


async def scrape_fallbacks(server: TensorlineServer) -> dict[str, float]:
    """``tensorline_fallbacks_total`` samples from the real /metrics endpoint, by label text."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    samples = {}
    for line in text.decode().splitlines():
        if line.startswith("tensorline_fallbacks_total{"):
            labels, value = line.rsplit(" ", 1)
            samples[labels.removeprefix("tensorline_fallbacks_total")] = float(value)
    return samples


async def expect_denied(client: AsyncClient, manifest: dict[str, Any], code: grpc.StatusCode,
                        fragment: str = "blocked by the sandbox") -> None:
    with pytest.raises(TensorlineError) as caught:
        await client.execute(manifest, {"bad": np.ones(2)}, timeout=60)
    error = caught.value
    assert error.code == code, error
    assert error.metadata["node_id"] == "bad" and "node 'bad'" in error.message
    assert fragment in error.message, error.message


async def test_a_trusted_node_the_sandbox_denied_is_never_re_run_in_process(
        server_factory: Callable[..., Any], leak_check: None, tmp_path: Path) -> None:
    """Fallback on (the default), trusted nodes hinted to the sandbox: each blocked action fails
    with a status naming the node and did not happen anywhere, the server included."""
    server = await server_factory(node_modules=["tests.nodes.basic", UNTRUSTED],
                                  enable_fallback=True, sandbox_cpu_seconds=2.0,
                                  sandbox_scratch_dir=tmp_path / "scratch", metrics_port=0,
                                  metrics_host="127.0.0.1")
    async with AsyncClient(f"127.0.0.1:{server.port}", retry_unavailable=False) as client:
        layers = {layer.name for layer in (await client.server_info()).sandbox_layers
                  if layer.active}
        assert {"seccomp", "landlock", "rlimits"} <= layers, layers

        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            listener.setblocking(False)
            port = listener.getsockname()[1]
            await expect_denied(client, hinted("TcpConnect", port=port), DENIED)
            await expect_denied(client, hinted("BlockedInit"), DENIED)
            with pytest.raises(BlockingIOError):
                listener.accept()

        outside = tmp_path / "escaped.txt"
        await expect_denied(client, hinted("WriteOutside", path=str(outside)), DENIED)
        assert not outside.exists()
        await expect_denied(client, hinted("Shell"), DENIED)
        await expect_denied(client, hinted("MemoryHog"), CAPPED, "memory limit")
        await expect_denied(client, hinted("CpuLoop"), CAPPED, "CPU time limit")
        await expect_denied(client, hinted("Segfault"), KILLED, "signal 11")
        sleeper = hinted("Sleeper")
        sleeper["nodes"][0]["timeout_s"] = 1.0  # the server's deadline, which names the node
        with pytest.raises(DeadlineExceededError, match="node 'bad'"):
            await client.execute(sleeper, {"bad": np.ones(1)}, timeout=60)
        # In-process, each of these would have succeeded; none was retried there.
        assert await scrape_fallbacks(server) == {}


@pytest.fixture
def server_only() -> NodeRegistry:
    registry = NodeRegistry.default(modules=["tests.nodes.basic"], entry_points=False)
    registry.register(ServerOnlyScale)
    return registry


async def test_a_node_the_worker_cannot_load_falls_back_and_is_reported(
        server_factory: Callable[..., Any], leak_check: None, server_only: NodeRegistry,
        caplog: pytest.LogCaptureFixture) -> None:
    server = await server_factory(registry=server_only, metrics_port=0,
                                  metrics_host="127.0.0.1")
    manifest = {"nodes": [{"id": "s", "node_type": "ServerOnlyScale", "params": {"factor": 3},
                           "runtime_hint": "sandbox"}]}
    async with AsyncClient(f"127.0.0.1:{server.port}", retry_unavailable=False) as client:
        before = await scrape_fallbacks(server)
        with caplog.at_level(logging.WARNING, logger="tensorline.server.selector"):
            result = await client.execute(manifest, {"s": np.arange(3.0)})
        np.testing.assert_array_equal(result["s"], [0.0, 3.0, 6.0])
        metrics = result.metrics.nodes[0]
        assert metrics.runtime == "inprocess"
        assert metrics.selection_reason.startswith("fallback from sandbox: ")
        assert "cannot load tensorline_tests_server_only.ServerOnlyScale" in metrics.fallback
        assert "No module named" in metrics.fallback
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and warnings[0].startswith(
            "node s (ServerOnlyScale): the sandbox could not host it (ModuleNotFoundError")
        label = '{node_type="ServerOnlyScale",reason="import"}'
        assert (await scrape_fallbacks(server)).get(label, 0.0) == before.get(label, 0.0) + 1.0

        info = await client.server_info()
        pids = server.engine.runtimes["sandbox"].worker_pids()
        assert info.worker_pool_size == len(pids) >= 1


async def test_a_node_the_worker_cannot_load_fails_without_fallback(
        server_factory: Callable[..., Any], leak_check: None, server_only: NodeRegistry) -> None:
    server = await server_factory(registry=server_only, enable_fallback=False)
    manifest = {"nodes": [{"id": "s", "node_type": "ServerOnlyScale", "runtime_hint": "sandbox"}]}
    async with AsyncClient(f"127.0.0.1:{server.port}", retry_unavailable=False) as client:
        with pytest.raises(TensorlineError) as caught:
            await client.execute(manifest, {"s": np.ones(2)})
    assert caught.value.code == KILLED
    assert caught.value.metadata["kind"] == "import"
    assert "node 's'" in caught.value.message and "No module named" in caught.value.message


async def test_a_server_without_its_sandbox_refuses_sandbox_nodes_without_fallback(
        server_factory: Callable[..., Any]) -> None:
    server = await server_factory(sandbox=False, enable_fallback=False)
    async with AsyncClient(f"127.0.0.1:{server.port}", retry_unavailable=False) as client:
        with pytest.raises(TensorlineError) as caught:
            await client.execute(hinted("PassThrough"), {"bad": np.ones(2)})
        info = await client.server_info()
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.message.startswith(
        "node 'bad' (PassThrough) must run in the sandbox runtime, which is not available")
    assert info.worker_pool_size == 0


def sandbox_workers(server_pid: int) -> list[psutil.Process]:
    """The server's workers: the children of its launcher (the server's one child)."""
    return [worker for launcher in psutil.Process(server_pid).children()
            for worker in launcher.children()]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="binding needs two CPUs or more")
@pytest.mark.parametrize("co_locate", [True, False])
def test_a_quiet_servers_sandboxed_calls_share_its_cpu_with_their_worker(
        co_locate: bool) -> None:
    manifest = one_node("Scale", {"factor": 2.0}, "sandbox", node_id="s")
    x = np.arange(256, dtype=np.float32)
    env = {"TENSORLINE_SANDBOX_CO_LOCATE": str(co_locate).lower()}
    with ServerProcess.start(env=env) as server, Client(server.target, timeout=60) as client:
        everywhere = os.sched_getaffinity(server.pid)
        assert len(everywhere) > 1

        def call() -> None:
            result = client.execute(manifest, {"s": x})
            np.testing.assert_array_equal(result.outputs["s"], x * 2)
            assert result.metrics.nodes[0].runtime == "sandbox"

        def bound_worker() -> int | None:
            # Calls one at a time, a poll interval apart: a quiet server.
            call()
            cpus = os.sched_getaffinity(server.pid)
            if len(cpus) != 1:
                return None
            return next((w.pid for w in sandbox_workers(server.pid)
                         if os.sched_getaffinity(w.pid) == cpus), None)

        if co_locate:
            assert wait_until(bound_worker, timeout=30, what="a worker bound to the loop's CPU")
        else:
            for _ in range(20):
                call()
            assert os.sched_getaffinity(server.pid) == everywhere
            assert all(os.sched_getaffinity(w.pid) == everywhere
                       for w in sandbox_workers(server.pid))


def scrape(metrics_port: int, name: str) -> float:
    """The value of the metric ``name`` (one sample, the sandbox runtime's) from /metrics."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and 'runtime="sandbox"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not on /metrics")


def one_worker_server(tmp_path: Path) -> tuple[ServerProcess, int]:
    """``tensorline serve`` with one sandbox worker and a long gathering wait (20 ms), and
    its metrics port."""
    metrics_port = free_port()
    server = ServerProcess.start(env={
        "TENSORLINE_SANDBOX_WORKERS": "1", "TENSORLINE_SANDBOX_MAX_WORKERS": "1",
        "TENSORLINE_SANDBOX_BATCH_WAIT_MS": "20", "TENSORLINE_METRICS_PORT": str(metrics_port),
        "TENSORLINE_METRICS_HOST": "127.0.0.1"}, log_dir=tmp_path)
    return server, metrics_port


async def scaled_by_three(client: AsyncClient, i: int) -> None:
    """One sandboxed Scale call whose input is ``i``'s own: the reply must be that input x3."""
    x = np.full(64, i, dtype=np.float32)
    result = await client.execute(one_node("Scale", {"factor": 3.0}, "sandbox", node_id="s"),
                                  {"s": x}, timeout=60)
    np.testing.assert_array_equal(result["s"], x * 3)
    assert result.metrics.nodes[0].runtime == "sandbox"


async def test_overlapping_callers_each_get_their_own_value_when_gathered(
        tmp_path: Path) -> None:
    """32 clients at once through a real server with one worker and gathering on: their
    sandboxed calls overlap and go through the gathering (counted on /metrics), and each
    client gets its own input scaled, never another's. (Whether a batch forms depends on
    timing here; tests/server/runtime/test_sandbox_gather.py makes batches form and checks
    each call's value and ids in them.)"""
    server, metrics = one_worker_server(tmp_path)
    with server:
        async with AsyncClient(server.target, retry_unavailable=False) as client:
            # Calls one at a time first: the node's calls are then known to be short.
            for i in range(3):
                await scaled_by_three(client, i)
            rounds = 0
            while scrape(metrics, "tensorline_sandbox_gathered_calls_total") == 0:
                rounds += 1
                assert rounds <= 20, "no call was gathered"
                await asyncio.gather(*(scaled_by_three(client, i) for i in range(32)))
