"""The plan cache and warm reusable instances, through a real server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from tensorline.client import AsyncClient
from tests.nodes.basic import EVENTS, EVENTS_LOCK, CountingModel


def events(key: str) -> list[str]:
    with EVENTS_LOCK:
        return list(EVENTS.get(key, []))


async def wait_for(key: str, event: str, count: int = 1) -> None:
    async with asyncio.timeout(10):
        # Cleanups of evicted instances run in background tasks (and may use threads): poll.
        while events(key).count(event) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def warm(name: str) -> dict[str, Any]:
    return {"version": "v1", "nodes": [{"id": "m", "node_type": "WarmModel",
                                        "params": {"name": name}}]}


async def test_second_identical_request_uses_the_cached_plan(client: AsyncClient) -> None:
    manifest = {"version": "v1", "nodes": [{"id": "s", "node_type": "Scale",
                                            "params": {"factor": 2}}]}
    first = await client.execute(manifest, {"s": np.ones(1)})
    second = await client.execute(manifest, {"s": np.full(1, 4.0)})
    assert first.metrics.plan_cached is False
    assert second.metrics.plan_cached is True
    np.testing.assert_array_equal(second["s"], [8.0])
    other = await client.execute({**manifest, "metadata": {"name": "other"}}, {"s": np.ones(1)})
    assert other.metrics.plan_cached is False


async def test_plan_cache_disabled(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(plan_cache_size=0)
    manifest = {"version": "v1", "nodes": [{"id": "p", "node_type": "PassThrough"}]}
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        for _ in range(2):
            result = await client.execute(manifest, {"p": np.ones(1)})
            assert result.metrics.plan_cached is False


async def test_reusable_node_is_initialized_once(client: AsyncClient) -> None:
    manifest = {"version": "v1", "nodes": [{"id": "model", "node_type": "CountingModel"}]}
    before = CountingModel.initializations
    results = [await client.execute(manifest, {"model": np.zeros(1)}) for _ in range(3)]
    # Concurrent first use of another manifest with the same node (same type and params).
    other = {"version": "v1", "nodes": [{"id": "again", "node_type": "CountingModel"}]}
    results += await asyncio.gather(*(client.execute(other, {"again": np.zeros(1)})
                                      for _ in range(4)))
    assert CountingModel.initializations - before == 1
    assert {int(r.outputs.get("model", r.outputs.get("again"))) for r in results} == {
        CountingModel.initializations}


async def test_concurrent_first_requests_share_one_initialization(
        server_factory: Callable[..., Any]) -> None:
    server = await server_factory()
    name = uuid.uuid4().hex
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        await asyncio.gather(*(client.execute(warm(name), {"m": np.zeros(1)}) for _ in range(5)))
    assert events(f"warm:{name}") == ["initialize"]


async def test_lru_eviction_runs_cleanup(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(warm_instances=1)
    a, b = f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        await client.execute(warm(a), {"m": np.zeros(1)})
        await client.execute(warm(a), {"m": np.zeros(1)})
        assert events(f"warm:{a}") == ["initialize"]
        await client.execute(warm(b), {"m": np.zeros(1)})  # evicts a
        await wait_for(f"warm:{a}", "cleanup")
        assert events(f"warm:{a}") == ["initialize", "cleanup"]
        assert events(f"warm:{b}") == ["initialize"]
        await client.execute(warm(a), {"m": np.zeros(1)})  # a again: loaded anew, b evicted
        await wait_for(f"warm:{b}", "cleanup")
        assert events(f"warm:{a}") == ["initialize", "cleanup", "initialize"]
    await server.stop(grace=0.5)
    # Shutdown cleans up what is still warm.
    assert events(f"warm:{a}") == ["initialize", "cleanup", "initialize", "cleanup"]


async def test_failed_warm_initialization_is_retried(client: AsyncClient) -> None:
    from tensorline.client import NodeError

    name = uuid.uuid4().hex
    manifest = {"version": "v1", "nodes": [{"id": "m", "node_type": "FlakyWarm",
                                            "params": {"name": name}}]}
    with pytest.raises(NodeError) as caught:
        await client.execute(manifest, {"m": np.zeros(1)})
    assert caught.value.exception_type == "ConnectionError"
    # A failed initialization is not kept: the next request initializes again, and succeeds.
    result = await client.execute(manifest, {"m": np.arange(2)})
    np.testing.assert_array_equal(result["m"], np.arange(2))
    await client.execute(manifest, {"m": np.arange(2)})
    assert events(f"flaky:{name}") == ["initialize", "cleanup", "initialize"]


async def test_eviction_waits_for_requests_using_the_instance(
        server_factory: Callable[..., Any]) -> None:
    from tests.nodes import spine

    server = await server_factory(warm_instances=1)
    gate, other = f"gate-{uuid.uuid4().hex}", f"other-{uuid.uuid4().hex}"
    manifest = {"version": "v1", "nodes": [{"id": "g", "node_type": "WarmGate",
                                            "params": {"name": gate}}]}
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        in_use = asyncio.ensure_future(client.execute(manifest, {"g": np.arange(3)}))
        async with asyncio.timeout(10):
            await spine.rendezvous_event(f"{gate}:in").wait()
        await client.execute(warm(other), {"m": np.zeros(1)})  # evicts the gate's instance
        assert events(f"gate:{gate}") == []  # still in use: not cleaned up under its feet
        spine.rendezvous_event(f"{gate}:go").set()
        result = await in_use
        np.testing.assert_array_equal(result["g"], np.arange(3))
        await wait_for(f"gate:{gate}", "cleanup")


async def test_plan_cache_evicts_least_recently_used(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(plan_cache_size=2)
    manifests = [{"version": "v1", "nodes": [{"id": "s", "node_type": "Scale",
                                              "params": {"factor": f}}]} for f in (1, 2, 3)]
    cached = []
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        for index in (0, 1, 0, 2, 0, 1):  # 2 evicts 1 (0 was used more recently); 1 comes back
            result = await client.execute(manifests[index], {"s": np.ones(1)})
            cached.append(result.metrics.plan_cached)
            np.testing.assert_array_equal(result["s"], [index + 1.0])
    assert cached == [False, False, True, False, True, False]
    assert len(server.engine.plans) == 2


async def test_instance_evicted_while_initializing_is_not_cleaned_up_under_its_waiter(
        server_factory: Callable[..., Any]) -> None:
    from tests.nodes import spine

    server = await server_factory(warm_instances=1)
    slow, other = f"slow-{uuid.uuid4().hex}", f"other-{uuid.uuid4().hex}"
    manifest = {"version": "v1", "nodes": [{"id": "m", "node_type": "SlowInitWarm",
                                            "params": {"name": slow}}]}
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        waiting = asyncio.ensure_future(client.execute(manifest, {"m": np.arange(2)}))
        async with asyncio.timeout(10):
            await spine.rendezvous_event(f"{slow}:init-in").wait()
        await client.execute(warm(other), {"m": np.zeros(1)})  # evicts the initializing one
        spine.rendezvous_event(f"{slow}:init-go").set()
        result = await waiting
        np.testing.assert_array_equal(result["m"], np.arange(2))
        await wait_for(f"slowinit:{slow}", "cleanup")
    assert events(f"slowinit:{slow}") == ["initialize", "process", "cleanup"]


async def test_evicted_initializing_instance_is_cleaned_up_when_its_waiter_left(
        server_factory: Callable[..., Any]) -> None:
    from tests.nodes import spine

    server = await server_factory(warm_instances=1)
    slow, other = f"slow-{uuid.uuid4().hex}", f"other-{uuid.uuid4().hex}"
    manifest = {"version": "v1", "nodes": [{"id": "m", "node_type": "SlowInitWarm",
                                            "params": {"name": slow}}]}
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        waiting = asyncio.ensure_future(client.execute(manifest, {"m": np.arange(2)}))
        async with asyncio.timeout(10):
            await spine.rendezvous_event(f"{slow}:init-in").wait()
        await client.execute(warm(other), {"m": np.zeros(1)})  # evicts the initializing one
        waiting.cancel()  # the only caller goes away while the initialization goes on
        with pytest.raises(asyncio.CancelledError):
            await waiting
        runtime = server.engine.runtimes["inprocess"]
        async with asyncio.timeout(10):
            while runtime._waiters:  # noqa: ASYNC110 (the server has seen the cancellation)
                await asyncio.sleep(0.005)
        spine.rendezvous_event(f"{slow}:init-go").set()
        await wait_for(f"slowinit:{slow}", "cleanup")
    await server.stop(grace=0.5)
    assert events(f"slowinit:{slow}") == ["initialize", "cleanup"]


async def test_shutdown_stops_a_warm_initialization_and_cleans_up(
        server_factory: Callable[..., Any]) -> None:
    from tensorline.client import TensorlineError
    from tests.nodes import spine

    server = await server_factory()
    slow = f"slow-{uuid.uuid4().hex}"
    manifest = {"version": "v1", "nodes": [{"id": "m", "node_type": "SlowInitWarm",
                                            "params": {"name": slow}}]}
    async with AsyncClient(f"127.0.0.1:{server.port}", retry_unavailable=False) as client:
        waiting = asyncio.ensure_future(client.execute(manifest, {"m": np.arange(2)}))
        async with asyncio.timeout(10):
            await spine.rendezvous_event(f"{slow}:init-in").wait()
        await server.stop(grace=0.2)
        with pytest.raises(TensorlineError):
            await waiting
    # The initialization never finished (nothing set init-go): stopping cancelled it, and the
    # instance was cleaned up before stop() returned.
    assert events(f"slowinit:{slow}") == ["cleanup"]
