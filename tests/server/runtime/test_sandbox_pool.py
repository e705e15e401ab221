"""The sandbox pool's size: concurrent slow calls grow a group's pool one worker at a time up to
``max_workers`` and no further (the rest wait in line, one call per worker: none queues on a
busy worker's turn while its initialize reply is being handled); once idle ``idle_s`` the grown
workers are retired back to the baseline and their processes exit; a worker holding a session's
instances is never retired for being idle, and goes once they are released."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from tensorline.server.nodes import Node
from tensorline.server.runtime import ExecutionScope, SandboxRuntime
from tests.server.runtime import sandbox_nodes as nodes
from tests.server.runtime.conftest import make_spec
from tests.support.polling import eventually

IDLE_S = 0.5
# The trusted default group: (memory_mb_default, "") with a baseline of ``workers`` workers.
GROUP = (2048, "")


@pytest.fixture
async def pool(no_leaks: None, tmp_path: Path) -> AsyncIterator[SandboxRuntime]:
    runtime = SandboxRuntime(workers=1, max_workers=3, idle_s=IDLE_S, call_timeout_s=60.0,
                             cpu_seconds=5.0, scratch_root=str(tmp_path / "scratch"))
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.shutdown()


def busy(runtime: SandboxRuntime) -> int:
    """Workers running a call right now."""
    return sum(1 for w in runtime._workers.values() if w.alive and w.inflight is not None)


def waiting(runtime: SandboxRuntime) -> int:
    line = runtime._waiters.get(GROUP)
    return 0 if line is None else sum(
        sum(1 for f in q if not f.done()) for q in line._lines.values())


def exited(pids: set[int]) -> bool:
    """Every pid is gone (reaped by the launcher), or at least a zombie."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


async def grow_to_max(runtime: SandboxRuntime, calls: int,
                      node: type[Node] = nodes.Gate) -> list[asyncio.Task[object]]:
    """Start ``calls`` calls that each hold a worker (``Gate`` until ``open_gates``, ``Marker``
    until cancelled); return once the pool is at its limit, every worker running one of them
    and the rest waiting in line."""
    spec = make_spec(node, {} if node is nodes.Gate else {"mode": "sleep"}, trusted=True)
    tasks = [asyncio.ensure_future(runtime.call(spec, ExecutionScope(f"slow{i}"), {"in": i}))
             for i in range(calls)]
    await eventually(lambda: busy(runtime) == runtime.max_workers
                     and waiting(runtime) == calls - runtime.max_workers, 60.0,
                     f"{runtime.max_workers} busy workers and the other calls waiting")
    return tasks


async def open_gates(runtime: SandboxRuntime, tasks: list[asyncio.Task[object]]) -> None:
    """Let every ``Gate`` call end (each worker's scratch gets a ``go`` file for every
    execution), and wait for their results."""
    def write() -> None:
        for view in runtime.scratch_views():
            for i in range(len(tasks)):
                Path(view, f"slow{i}.go").write_text("")

    write()  # a few empty files in tmpfs: nothing worth a thread
    assert await asyncio.gather(*tasks) == list(range(len(tasks)))


async def stop(tasks: list[asyncio.Task[object]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# Gate: a one-shot node (its first call per worker goes the general way: initialize, then run);
# Marker: initialize + cleanup, every call creates an instance (initialize request) first.
@pytest.mark.parametrize("node", [nodes.Gate, nodes.Marker])
async def test_concurrent_slow_calls_grow_the_pool_to_max_workers_and_no_further(
        pool: SandboxRuntime, node: type[Node]) -> None:
    assert len(pool.worker_pids()) == 1
    tasks = await grow_to_max(pool, calls=5, node=node)
    try:
        assert len(pool.worker_pids()) == 3 and pool.stats()["workers"] == 3
        # One call per worker; the other two wait in the pool's line, not on a worker's turn.
        assert [w.queued for w in pool._workers.values()] == [1, 1, 1]
        # Nothing else is starting or asked for, and the domain has no room for more: the two
        # waiting calls wait for one of the three, not for a fourth worker.
        assert not any(w.state == "starting" for w in pool._workers.values())
        assert not pool._pending.get(GROUP)
        assert pool._grow(GROUP) is False
    finally:
        await stop(tasks)


async def test_grown_workers_are_retired_after_idle_and_their_processes_exit(
        pool: SandboxRuntime) -> None:
    baseline = set(pool.worker_pids())
    tasks = await grow_to_max(pool, calls=3)
    grown = set(pool.worker_pids()) - baseline
    assert len(grown) == 2
    await open_gates(pool, tasks)
    # Back to the baseline: one worker (the most recently used survives, whichever it is).
    await eventually(lambda: len(pool.worker_pids()) == 1, 30.0, "the pool to shrink to 1")
    assert pool.stats()["workers"] == 1
    retired = (baseline | grown) - set(pool.worker_pids())
    assert len(retired) == 2
    await eventually(lambda: exited(retired), 20.0, "the retired workers to exit")
    # Retired, not recycled, and not replaced: the count stays at the baseline.
    assert pool.stats()["worker_recycles"] == 0
    # And the pool still serves (and may grow again).
    probe = make_spec(nodes.Identity, trusted=True)
    assert await pool.call(probe, ExecutionScope("after"), {"in": 7}) == {"in": 7}


async def test_a_worker_holding_instances_is_not_shrunk(pool: SandboxRuntime) -> None:
    tasks = await grow_to_max(pool, calls=3)
    # Two session instances of a stateful node (initialize and cleanup), acquired while all
    # three workers are busy: a session's instance is hosted at once on the least loaded
    # worker, so the two land on two different workers and initialize there once they are
    # free.
    spec = make_spec(nodes.Marker, trusted=True)
    acquiring = [asyncio.ensure_future(pool.acquire(spec, ExecutionScope(f"session{i}")))
                 for i in range(2)]
    # Placed: their initialize requests wait for the workers' turns behind the three calls.
    await eventually(lambda: sum(w.queued for w in pool._workers.values()) == 3 + 2, 10.0,
                     "both instances placed")
    await open_gates(pool, tasks)
    held = await asyncio.gather(*acquiring)
    holders = {instance.worker.pid for instance in held}  # type: ignore[attr-defined]
    assert len(holders) == 2
    # The third worker is retired once idle; the two holders stay, however long they idle.
    await eventually(lambda: set(pool.worker_pids()) == holders, 30.0,
                     "the pool to shrink to the two workers holding instances")
    loop = asyncio.get_running_loop()
    await eventually(lambda: all(loop.time() - w.last_used > IDLE_S * 2
                                 for w in pool._workers.values() if w.alive), 10.0,
                     "the holders to have idled past idle_s")
    pool._shrink()
    assert set(pool.worker_pids()) == holders
    assert all(w.state == "ready" for w in pool._workers.values() if w.pid in holders)
    # Released (cleanup runs in the worker), one of them goes too: back to the baseline.
    for instance in held:
        await pool.release(instance)
    await eventually(lambda: len(pool.worker_pids()) == 1, 30.0, "the pool to shrink to 1")
    gone = holders - set(pool.worker_pids())
    await eventually(lambda: exited(gone), 20.0, "the retired holder to exit")
