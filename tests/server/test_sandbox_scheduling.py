"""Scheduling sandboxed work through a real server: sessions never deadlock on the worker pool.

Chains of sandboxed nodes longer than the pool run session after session and concurrently;
32 concurrent sessions of a fan-out/fan-in graph with sandboxed nodes stay bit-exact; an
untrusted domain's pool grows under a flood and a cheap call of another caller is served
before the rest of the flood; a call that cannot get a worker before its deadline is refused
with RESOURCE_EXHAUSTED naming the node and the pool, and a call a client deadline kills is
reported naming the node.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorline.client import (
    AsyncClient,
    DeadlineExceededError,
    LimitExceededError,
)
from tensorline.server import TensorlineServer
from tensorline.server.runtime import SandboxRuntime
from tests.server.conftest import UNTRUSTED
from tests.support.polling import eventually

POOL = f"untrusted:{UNTRUSTED}"


def chain(node_type: str, length: int, **params: Any) -> dict[str, Any]:
    """src (in-process) -> s0 -> ... -> s<length-1>, all sandboxed."""
    nodes = [{"id": "src", "node_type": "PassThrough", "runtime_hint": "inprocess"}]
    connections = []
    previous = "src"
    for i in range(length):
        nodes.append({"id": f"s{i}", "node_type": node_type, "params": params,
                      "runtime_hint": "sandbox"})
        connections.append({"from": previous, "to": f"s{i}"})
        previous = f"s{i}"
    return {"nodes": nodes, "connections": connections}


async def run_session(client: AsyncClient, manifest: dict[str, Any], source: str,
                      values: list[np.ndarray], timeout: float = 30.0) -> list[Any]:
    """Send ``values`` while reading the outputs (no reliance on buffers holding them all)."""
    async with client.stream(manifest, timeout=timeout) as s:
        async def send() -> None:
            for value in values:
                await s.send(source, value)
            await s.close()

        sender = asyncio.ensure_future(send())
        outputs = [o async for o in s]
        await sender
    return outputs


def sandbox_of(server: TensorlineServer) -> SandboxRuntime:
    runtime = server.engine.runtimes["sandbox"]
    assert isinstance(runtime, SandboxRuntime)
    return runtime


@pytest.fixture
async def small_pool(server_factory: Callable[..., Any], leak_check: None,
                     tmp_path: Path) -> TensorlineServer:
    server: TensorlineServer = await server_factory(
        untrusted_modules=[UNTRUSTED], sandbox_workers=2, sandbox_max_workers=2,
        sandbox_scratch_dir=tmp_path)
    return server


@pytest.mark.parametrize(("node_type", "length"), [("Scale", 3), ("Scale", 6),
                                                   ("CleanupOnly", 5)])
async def test_chains_longer_than_the_pool(small_pool: TensorlineServer, node_type: str,
                                           length: int) -> None:
    """One-shot nodes (Scale) are dispatched per chunk; stateful ones (CleanupOnly) are hosted
    several to a worker: either way no session waits for a worker another session (or its own
    other nodes) holds, one after another or concurrently."""
    params = {"factor": 2.0} if node_type == "Scale" else {}
    manifest = chain(node_type, length, **params)
    factor = 2.0 ** length if node_type == "Scale" else 1.0
    x = [np.arange(8.0) + i for i in range(5)]
    async with AsyncClient(f"127.0.0.1:{small_pool.port}", retry_unavailable=False) as client:
        for _ in range(4):
            outputs = await run_session(client, manifest, "src", x, timeout=15)
            assert [o.sequence for o in outputs] == list(range(5))
            for o, value in zip(outputs, x, strict=True):
                assert np.array_equal(o.value, value * factor)
        sessions = await asyncio.gather(*(run_session(client, manifest, "src", x, timeout=15)
                                          for _ in range(8)))
    for outputs in sessions:
        assert [np.asarray(o.value).tolist() for o in outputs] == [
            (value * factor).tolist() for value in x]
    # The pool stayed within its bounds: 2 trusted workers, at most 2 of the untrusted domain.
    assert len(sandbox_of(small_pool).worker_pids()) <= 2 + 2


FAN = {"nodes": [
    {"id": "src", "node_type": "PassThrough", "runtime_hint": "inprocess"},
    {"id": "a", "node_type": "Scale", "params": {"factor": 2.0}, "runtime_hint": "sandbox"},
    {"id": "b", "node_type": "Scale", "params": {"factor": -0.5}, "runtime_hint": "sandbox"},
    {"id": "j", "node_type": "Add", "runtime_hint": "sandbox"},
], "connections": [{"from": "src", "to": "a"}, {"from": "src", "to": "b"},
                   {"from": "a", "to": "j"}, {"from": "b", "to": "j"}]}


async def test_32_sessions_of_a_fan_out_fan_in_graph_are_bit_exact(
        small_pool: TensorlineServer) -> None:
    rng = np.random.default_rng(11)
    inputs = [[rng.standard_normal(16) for _ in range(50)] for _ in range(32)]
    async with AsyncClient(f"127.0.0.1:{small_pool.port}", retry_unavailable=False) as client:
        results = await asyncio.gather(*(run_session(client, FAN, "src", values, timeout=60)
                                         for values in inputs))
    for values, outputs in zip(inputs, results, strict=True):
        assert [o.sequence for o in outputs] == list(range(50))
        for o, x in zip(outputs, values, strict=True):
            expected = x * np.float64(2.0) + x * np.float64(-0.5)
            assert o.value.dtype == expected.dtype
            assert o.value.tobytes() == expected.tobytes()


def nap(seconds: float) -> dict[str, Any]:
    return {"nodes": [{"id": "slow", "node_type": "Nap", "params": {"seconds": seconds}}]}


ECHO = {"nodes": [{"id": "cheap", "node_type": "Echo"}]}


async def test_untrusted_flood_grows_the_pool_and_a_cheap_call_gets_through(
        server_factory: Callable[..., Any], leak_check: None, tmp_path: Path) -> None:
    """The untrusted domain starts with one worker and grows to ``sandbox_max_workers`` under
    a flood of slow calls; a cheap call of another caller is served by the next worker that
    frees up (round robin by caller), not after the whole flood."""
    server = await server_factory(untrusted_modules=[UNTRUSTED], sandbox_workers=1,
                                  sandbox_max_workers=2, sandbox_scratch_dir=tmp_path)
    runtime = sandbox_of(server)
    target = f"127.0.0.1:{server.port}"
    group = (runtime.memory_mb_default, UNTRUSTED)

    def busy() -> int:
        return sum(1 for w in runtime._workers.values()
                   if w.group == group and w.inflight is not None)

    # Callers are told apart by their connection (the peer); channels of one process share
    # connections unless asked not to, as separate client processes would not.
    async with AsyncClient(target, retry_unavailable=False) as flooder, \
            AsyncClient(target, retry_unavailable=False,
                        extra_options=(("grpc.use_local_subchannel_pool", 1),)) as other:
        loop = asyncio.get_running_loop()
        done_at: list[float] = []

        async def slow() -> Any:
            result = await flooder.execute(nap(2.0), {"slow": np.ones(1)}, timeout=30)
            done_at.append(loop.time())
            return result

        flood = [asyncio.ensure_future(slow()) for _ in range(6)]
        await eventually(lambda: busy() == 2, 15.0, "the domain's pool to grow to 2 busy workers")
        result = await other.execute(ECHO, {"cheap": np.arange(3.0)}, timeout=15.0)
        cheap_at = loop.time()
        np.testing.assert_array_equal(result["cheap"], np.arange(3.0))
        for outcome in await asyncio.gather(*flood):
            np.testing.assert_array_equal(outcome["slow"], np.ones(1))
        # Round robin: the cheap call takes the first or second worker that frees up, so at
        # most 2 flood calls end before it (3 if it reached the line only after the first one
        # ended). One FIFO line would put it behind the 4 waiting flood calls: 5 would end
        # first (the check used to be "before the last one ended", which one FIFO line passes
        # too: the cheap call then runs as the last two flood calls end, milliseconds apart).
        before = sum(1 for t in done_at if t < cheap_at)
        assert before <= 3, (before, cheap_at, sorted(done_at))


async def test_waiting_past_the_deadline_is_resource_exhausted_naming_node_and_pool(
        server_factory: Callable[..., Any], leak_check: None, tmp_path: Path) -> None:
    server = await server_factory(untrusted_modules=[UNTRUSTED], sandbox_workers=1,
                                  sandbox_max_workers=1, sandbox_scratch_dir=tmp_path)
    runtime = sandbox_of(server)
    target = f"127.0.0.1:{server.port}"
    async with AsyncClient(target, retry_unavailable=False) as client:
        hog = asyncio.ensure_future(client.execute(nap(3.0), {"slow": np.ones(1)}, timeout=30))
        await eventually(lambda: any(w.domain == UNTRUSTED and w.inflight is not None
                                     for w in runtime._workers.values()), 15.0, "the nap to run")
        with pytest.raises(LimitExceededError) as info:
            await client.execute(ECHO, {"cheap": np.ones(1)}, timeout=1.0)
        error = info.value
        assert "node 'cheap' (Echo)" in error.message and POOL in error.message, error.message
        assert error.retry_after_s is not None
        # The same in a stream: the chunk's call waits, then the session ends with it.
        with pytest.raises(LimitExceededError, match="node 'cheap'"):
            await run_session(client, ECHO, "cheap", [np.ones(1)], timeout=1.0)
        await hog


async def test_a_client_deadline_that_kills_a_sandboxed_call_names_the_node(
        small_pool: TensorlineServer, caplog: pytest.LogCaptureFixture) -> None:
    async with AsyncClient(f"127.0.0.1:{small_pool.port}", retry_unavailable=False) as client:
        with pytest.raises(DeadlineExceededError, match="slow"):
            await client.execute(nap(30.0), {"slow": np.ones(1)}, timeout=1.0)
        # The worker was killed at once (not after the 5 s grace), and the log says so.
        await eventually(lambda: "ended: deadline" in caplog.text, 10.0, "the worker's end")
        assert "did not stop within" not in caplog.text
        result = await client.execute(ECHO, {"cheap": np.arange(2.0)}, timeout=10)
        np.testing.assert_array_equal(result["cheap"], np.arange(2.0))


STREAMING = {"nodes": [
    {"id": "a", "node_type": "PassThrough", "runtime_hint": "inprocess"},
    {"id": "b", "node_type": "Scale", "params": {"factor": 3}, "runtime_hint": "sandbox"},
    {"id": "c", "node_type": "Accumulator", "params": {"count": 1}, "runtime_hint": "sandbox"},
], "connections": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}]}


async def test_streaming_sessions_never_take_more_workers_than_their_budget(
        server_factory: Callable[..., Any], leak_check: None, tmp_path: Path) -> None:
    """Bursts of sessions with a sandboxed streaming node (a worker each) and a sandboxed
    stateless node (per-chunk calls, which grow the shared pool): at most
    ``sandbox_max_workers`` sessions hold a worker, the others are refused with
    RESOURCE_EXHAUSTED and retry info, and the pool never passes its two budgets. (Sessions
    opened at once each started a worker, and a session took a free shared worker without
    counting it, so the per-chunk calls grew the pool again for the next session to take: the
    1,000-stream soak saw 17 workers with a limit of 4 + 4.)"""
    server = await server_factory(sandbox_workers=1, sandbox_max_workers=2,
                                  sandbox_scratch_dir=tmp_path)
    runtime = sandbox_of(server)
    trusted = [(runtime.memory_mb_default, "")]
    peak = 0

    def measure() -> None:
        nonlocal peak
        peak = max(peak, sum(1 for w in runtime._workers.values() if w.group in trusted))

    opened: list[Any] = []
    refusals = 0
    async with AsyncClient(f"127.0.0.1:{server.port}", retry_unavailable=False) as client:
        for _ in range(4):
            burst = [client.stream(STREAMING, timeout=30) for _ in range(4)]
            outcomes = await asyncio.gather(*(s.open() for s in burst), return_exceptions=True)
            measure()
            for stream, outcome in zip(burst, outcomes, strict=True):
                if outcome is None:
                    opened.append(stream)
                    continue
                assert isinstance(outcome, LimitExceededError), repr(outcome)
                assert "node 'c' (Accumulator)" in outcome.message, outcome.message
                assert outcome.retry_after_s is not None
                refusals += 1
            # A chunk through every open session at once: node b's calls grow the shared pool.
            for stream in opened:
                await stream.send("a", np.ones(4))
            for stream in opened:
                out = await stream.__anext__()
                np.testing.assert_array_equal(out.value, np.full(4, 3.0))
            measure()
        assert len(opened) == 2 and refusals == 14
        for stream in opened:
            await stream.close()
    # 2 shared (the baseline one included) and 2 dedicated.
    assert peak <= 4, peak
