"""Sync in-process nodes on the event loop or in the thread pool (runtime/_inline.py), through a
real server: a blocking node never stalls a concurrent fast call, a node that turns slow goes
back to the pool, declared traits and per-call timeouts are honoured."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

from tensorline.client import AsyncClient, DeadlineExceededError
from tensorline.server import TensorlineServer
from tensorline.server.runtime._inline import FIRST_STREAK, MAX_STREAK, InlinePace
from tests.conftest import TEST_NODE_MODULES
from tests.nodes import pace

# Far more fast calls than a promotion needs, for a shared machine where a trivial call in a
# pool thread now and then takes longer than the bound (each resets the streak).
MAX_CALLS_TO_PROMOTE = 40 * FIRST_STREAK


@pytest.fixture
async def served(server_factory: Callable[..., Any]
                 ) -> AsyncIterator[tuple[TensorlineServer, AsyncClient]]:
    pace.reset()
    server = await server_factory(node_modules=[*TEST_NODE_MODULES, "tests.nodes.pace"],
                                  inline_sync_max_ms=pace.INLINE_BOUND_MS)
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        yield server, client
    pace.reset()  # opens any gate a failed test left closed


def one(node_type: str, **extra: Any) -> dict[str, Any]:
    return {"version": "v1", "nodes": [{"id": "n", "node_type": node_type, **extra}]}


async def run(client: AsyncClient, node_type: str, **extra: Any) -> None:
    result = await client.execute(one(node_type, **extra), {"n": np.arange(3.0)}, timeout=60)
    np.testing.assert_array_equal(result["n"], np.arange(3.0))


def inline_types(server: TensorlineServer) -> float:
    return server.engine.runtimes["inprocess"].stats()["inline_node_types"]


async def promote(server: TensorlineServer, client: AsyncClient, node_type: str) -> None:
    """Call ``node_type`` (fast) until its type runs on the loop."""
    for _ in range(MAX_CALLS_TO_PROMOTE):
        if inline_types(server):
            return
        await run(client, node_type)
    raise AssertionError(f"{node_type} was never promoted to the event loop")


async def entered(name: str) -> None:
    """Poll (on the loop the server shares with this test) until the gated call is inside."""
    arrived, _ = pace.gate(name)
    for _ in range(6000):
        if arrived.is_set():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"the gated call never reached gate {name}")


async def fast_call_completes_while_gated(client: AsyncClient, node_type: str) -> str:
    """Start a ``node_type`` call that blocks on a gate, complete a fast call meanwhile, then
    open the gate. Returns the thread the gated call ran in."""
    name = uuid.uuid4().hex
    pace.MODE[node_type] = "gate"
    gated = asyncio.ensure_future(run(client, node_type, params={"gate": name}))
    try:
        await entered(name)
        # Another node type: its call cannot complete unless the event loop is free.
        result = await client.execute({"version": "v1", "nodes": [
            {"id": "s", "node_type": "Scale", "params": {"factor": 2}}]},
            {"s": np.ones(4)}, timeout=60)
        np.testing.assert_array_equal(result["s"], np.full(4, 2.0))
        # The fast call finished while the blocking one was still inside its node.
        _, release = pace.gate(name)
        assert not release.is_set() and not gated.done()
    finally:
        pace.gate(name)[1].set()
    await gated
    return pace.THREADS[node_type][-1]


async def test_a_blocking_sync_node_does_not_stall_a_concurrent_fast_call(
        served: tuple[TensorlineServer, AsyncClient]) -> None:
    _, client = served
    thread = await fast_call_completes_while_gated(client, "PacedMeasured")
    assert thread.startswith("tensorline-node")


async def test_a_sync_node_that_turns_slow_goes_back_to_the_pool(
        served: tuple[TensorlineServer, AsyncClient]) -> None:
    server, client = served
    main = threading.main_thread().name  # the loop's thread (server and test share it)
    await promote(server, client, "PacedMeasured")
    assert pace.THREADS["PacedMeasured"][0].startswith("tensorline-node")  # first: pooled
    await run(client, "PacedMeasured")
    assert pace.THREADS["PacedMeasured"][-1] == main
    # One slow call: it runs on the loop (the one stall the policy allows), then the type is
    # back in the pool.
    demotions = server.engine.runtimes["inprocess"].stats()["inline_demotions"]
    pace.MODE["PacedMeasured"] = "slow"
    await run(client, "PacedMeasured")
    assert pace.THREADS["PacedMeasured"][-1] == main
    stats = server.engine.runtimes["inprocess"].stats()
    assert stats["inline_node_types"] == 0 and stats["inline_demotions"] == demotions + 1
    # Its next call blocks, in a pool thread: a concurrent fast call completes meanwhile.
    thread = await fast_call_completes_while_gated(client, "PacedMeasured")
    assert thread.startswith("tensorline-node")


async def test_declared_short_runs_inline_from_its_first_call(
        served: tuple[TensorlineServer, AsyncClient]) -> None:
    server, client = served
    await run(client, "PacedShort")
    assert pace.THREADS["PacedShort"] == [threading.main_thread().name]
    assert inline_types(server) == 1


async def test_declared_blocking_always_runs_in_the_pool(
        served: tuple[TensorlineServer, AsyncClient]) -> None:
    server, client = served
    for _ in range(FIRST_STREAK * 2):
        await run(client, "PacedBlocking")
    assert all(t.startswith("tensorline-node") for t in pace.THREADS["PacedBlocking"])
    assert inline_types(server) == 0
    thread = await fast_call_completes_while_gated(client, "PacedBlocking")
    assert thread.startswith("tensorline-node")


async def test_a_node_with_a_timeout_stays_in_the_pool_where_the_timeout_applies(
        served: tuple[TensorlineServer, AsyncClient]) -> None:
    server, client = served
    await promote(server, client, "PacedMeasured")
    # The same type with a per-call timeout: pooled, and stopped at its timeout.
    name = uuid.uuid4().hex
    pace.MODE["PacedMeasured"] = "gate"
    try:
        with pytest.raises(DeadlineExceededError):
            await run(client, "PacedMeasured", params={"gate": name}, timeout_s=0.2)
    finally:
        pace.gate(name)[1].set()
    assert pace.THREADS["PacedMeasured"][-1].startswith("tensorline-node")


async def test_inline_bound_zero_keeps_every_sync_node_in_the_pool(
        server_factory: Callable[..., Any]) -> None:
    pace.reset()
    server = await server_factory(node_modules=[*TEST_NODE_MODULES, "tests.nodes.pace"],
                                  inline_sync_max_ms=0)
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        for node_type in ("PacedShort", "PacedMeasured"):
            for _ in range(FIRST_STREAK * 2):
                await run(client, node_type)
            assert all(t.startswith("tensorline-node") for t in pace.THREADS[node_type])
    assert inline_types(server) == 0


# --- the decision itself -----------------------------------------------------------------------

def test_promotion_needs_a_streak_and_each_demotion_doubles_it() -> None:
    p = InlinePace(0.001, never=False, short=False)
    for _ in range(FIRST_STREAK - 1):
        p.ran(0.0001)
    assert not p.inline
    p.ran(0.0001)
    assert p.inline
    p.ran(0.5)  # one slow call
    assert not p.inline and p.needed == 2 * FIRST_STREAK
    for _ in range(2 * FIRST_STREAK - 1):
        p.ran(0.0001)
    p.ran(0.002)  # a slow pooled call restarts the streak (no doubling: it was not inline)
    assert not p.inline and p.streak == 0 and p.needed == 2 * FIRST_STREAK
    for _ in range(2 * FIRST_STREAK):
        p.ran(0.0001)
    assert p.inline


def test_the_streak_a_demoted_type_needs_is_capped() -> None:
    p = InlinePace(0.001, never=False, short=True)
    for _ in range(40):
        p.ran(1.0)
        for _ in range(p.needed):
            p.ran(0.0)
    assert p.needed == MAX_STREAK and p.inline


def test_never_is_never_inline() -> None:
    p = InlinePace(0.001, never=True, short=True)
    for _ in range(FIRST_STREAK * 4):
        p.ran(0.0)
    assert not p.inline
    assert not InlinePace(0.0, never=False, short=True).inline
