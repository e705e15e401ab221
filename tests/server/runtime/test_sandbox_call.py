"""``SandboxRuntime.call``, the executor's entry point: one-shot nodes (no initialize, no
cleanup) run with one ``run`` request naming their class by an id the worker was told once; the
id cache survives workers being replaced or forgetting ids, and the node's context, errors,
deadlines, cancellation and a busy pool behave as through acquire/process/release."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tensorline.server._errors import DeadlineExceeded, NodeFailed
from tensorline.server.runtime import ExecutionScope, SandboxRuntime, WorkerFailure
from tensorline.wire._values import Json
from tests.server.runtime import sandbox_nodes as nodes
from tests.server.runtime.conftest import make_spec
from tests.support.polling import eventually


def markers(runtime: SandboxRuntime, execution_id: str) -> set[str]:
    return {p.name.split(".", 1)[1] for view in runtime.scratch_views()
            for p in Path(view).glob(f"{execution_id}.*")}


async def probe(runtime: SandboxRuntime, *, node_id: str = "n1", execution_id: str = "x",
                tag: str = "", value: Any = 1) -> dict[str, Any]:
    spec = make_spec(nodes.OneShot, {"tag": tag}, node_id=node_id)
    out = await runtime.call(spec, ExecutionScope(execution_id), {"in": value})
    assert isinstance(out, Json)
    assert isinstance(out.value, dict)
    return out.value


def known_ids(runtime: SandboxRuntime) -> dict[int, dict[Any, int]]:
    return {w.wid: dict(w.class_ids) for w in runtime._workers.values() if w.alive}


async def warm_up(runtime: SandboxRuntime) -> None:
    """Every worker of the test domain has imported the test nodes' module (the first call of
    a module's node goes the general way, with an initialize request)."""
    for _ in range(3):
        await asyncio.gather(*(probe(runtime, execution_id="warm") for _ in range(2)))


async def test_one_shot_nodes_get_their_own_context(sandbox: SandboxRuntime) -> None:
    await warm_up(sandbox)
    assert any(known_ids(sandbox).values()), "the class was never sent by id"
    seen = []
    for i in range(6):
        out = await probe(sandbox, node_id=f"node{i % 2}", execution_id=f"e{i}",
                          tag=f"t{i % 3}", value=i)
        assert (out["node_id"], out["execution_id"], out["tag"], out["in"]) == (
            f"node{i % 2}", f"e{i}", f"t{i % 3}", i)
        assert out["runtime"] == "sandbox"
        assert out["scratch_dir"] and Path(out["scratch_dir"]).name.startswith("w")
        seen.append(out["pid"])
    assert set(seen) <= set(sandbox.worker_pids())
    # One id per (class, params) and worker, whatever the node and execution ids.
    for ids in known_ids(sandbox).values():
        assert len(set(ids.values())) == len(ids) <= 4


async def test_an_id_the_worker_does_not_know_means_a_clean_start(
        sandbox: SandboxRuntime) -> None:
    await warm_up(sandbox)
    restarts = sandbox.stats()["worker_restarts"]
    for worker in sandbox._workers.values():
        for key in worker.class_ids:
            worker.class_ids[key] = 10**9 + worker.wid  # never defined in that worker
    served = set()
    for i in range(4):
        out = await probe(sandbox, execution_id=f"u{i}", value=i)
        assert out["in"] == i
        served.add(out["pid"])
    # Where a call ran, the bogus id is gone (replaced by a real one once a call defined the
    # class again), and no worker was killed for it.
    for worker in sandbox._workers.values():
        if worker.pid in served:
            assert worker.class_ids and all(class_id < 10**9 for class_id in worker.class_ids.values())
    assert sandbox.stats()["worker_restarts"] == restarts


async def test_replaced_workers_are_told_the_class_again(sandbox: SandboxRuntime) -> None:
    await warm_up(sandbox)
    before = set(sandbox.worker_pids())
    for pid in list(before):
        os.kill(pid, signal.SIGKILL)
    await eventually(lambda: len(set(sandbox.worker_pids()) - before) >= 3, 20.0,
                     "replacement workers")
    for i in range(6):
        out = await probe(sandbox, execution_id=f"r{i}", value=i)
        assert out["in"] == i and out["pid"] not in before


async def test_one_shot_errors_are_the_nodes(sandbox: SandboxRuntime) -> None:
    await warm_up(sandbox)
    spec = make_spec(nodes.OneShot, {"mode": "fail"})
    for _ in range(3):  # the first defines the class id, the others use it
        with pytest.raises(NodeFailed) as err:
            await sandbox.call(spec, ExecutionScope("f"), {"in": 1})
        assert err.value.node_id == "n1" and err.value.exc_type == "ValueError"
        assert "one-shot failure" in err.value.message
    assert (await probe(sandbox))["in"] == 1


async def test_a_one_shot_crash_fails_the_call_and_the_pool_recovers(
        sandbox: SandboxRuntime) -> None:
    await warm_up(sandbox)
    with pytest.raises(WorkerFailure) as err:
        await sandbox.call(make_spec(nodes.Segfault), ExecutionScope("crash"), {"in": 1})
    assert "SIGSEGV" in err.value.cause and err.value.during == "process"
    assert not err.value.fallback_eligible
    await eventually(lambda: sandbox.stats()["worker_restarts"] >= 1, 20.0, "a restart")
    assert (await probe(sandbox, value=5))["in"] == 5


async def test_one_shot_deadlines(sandbox: SandboxRuntime) -> None:
    await warm_up(sandbox)
    loop = asyncio.get_running_loop()
    # Sleeper's module is imported in the domain's workers already: the one-shot path.
    with pytest.raises(DeadlineExceeded, match="node 'n1'"):
        await sandbox.call(make_spec(nodes.Sleeper), ExecutionScope("d", deadline=loop.time()
                                                                    + 0.5), {"in": 1})
    with pytest.raises(DeadlineExceeded, match="timeout"):
        await sandbox.call(make_spec(nodes.Sleeper, timeout_s=0.3), ExecutionScope("t"),
                           {"in": 1})
    assert (await probe(sandbox, value=2))["in"] == 2


async def test_cancelling_a_one_shot_call_reaches_the_node(sandbox: SandboxRuntime) -> None:
    await warm_up(sandbox)
    restarts = sandbox.stats()["worker_restarts"]
    spec = make_spec(nodes.OneShot, {"mode": "sleep"})
    for i in range(3):
        execution = f"c{i}"
        task = asyncio.ensure_future(sandbox.call(spec, ExecutionScope(execution), {"in": 1}))
        await eventually(lambda e=execution: "process" in markers(sandbox, e), 20.0, "process")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda e=execution: "cancelled" in markers(sandbox, e), 20.0,
                         "the node to see the cancellation")
    assert sandbox.stats()["worker_restarts"] == restarts
    assert (await probe(sandbox, value=3))["in"] == 3


async def test_calls_wait_for_a_busy_pool(sandbox: SandboxRuntime) -> None:
    await warm_up(sandbox)
    outs = await asyncio.gather(*(probe(sandbox, execution_id=f"b{i}", value=i)
                                  for i in range(40)))
    assert [out["in"] for out in outs] == list(range(40))
    assert all(w.queued == 0 and w.reserved == 0 and not w.pinned
               for w in sandbox._workers.values() if w.alive)


async def test_a_node_with_cleanup_still_gets_it(sandbox: SandboxRuntime) -> None:
    spec = make_spec(nodes.CleanupOnly)
    for i in range(3):
        assert await sandbox.call(spec, ExecutionScope(f"k{i}"), {"in": i}) == i
        await eventually(lambda e=f"k{i}": "cleanup" in markers(sandbox, e), 20.0, "cleanup")


async def test_cancelling_queued_one_shot_calls(sandbox: SandboxRuntime) -> None:
    """Calls waiting for a busy pool, some of them already handed a worker by the reply that
    freed it, can be cancelled: the running ones see ``cancelled``, none is left behind, and
    the pool serves on without a restart."""
    await warm_up(sandbox)
    restarts = sandbox.stats()["worker_restarts"]
    spec = make_spec(nodes.OneShot, {"mode": "sleep"})
    tasks = [asyncio.ensure_future(sandbox.call(spec, ExecutionScope(f"q{i}"), {"in": i}))
             for i in range(8)]
    await eventually(lambda: sum("process" in markers(sandbox, f"q{i}") for i in range(8)) >= 2,
                     20.0, "two calls running")
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    started = [i for i in range(8) if "process" in markers(sandbox, f"q{i}")]
    for i in started:
        await eventually(lambda e=f"q{i}": "cancelled" in markers(sandbox, e), 20.0,
                         "the node to see the cancellation")
    await eventually(lambda: all(w.queued == 0 and w.inflight is None
                                 for w in sandbox._workers.values() if w.alive), 20.0,
                     "the workers to be idle")
    assert not any(sandbox._waiters.values()) and not sandbox._runs
    assert sandbox.stats()["worker_restarts"] == restarts
    outs = await asyncio.gather(*(probe(sandbox, execution_id=f"after{i}", value=i)
                                  for i in range(6)))
    assert [out["in"] for out in outs] == list(range(6))


async def test_queued_calls_get_the_worker_the_reply_freed(sandbox: SandboxRuntime) -> None:
    """Under load a reply sends the next waiting call's request at once; deadlines and errors
    of such calls are theirs alone."""
    await warm_up(sandbox)
    loop = asyncio.get_running_loop()
    fail = make_spec(nodes.OneShot, {"mode": "fail"})
    calls: list[Any] = []
    for i in range(24):
        if i % 3 == 0:
            calls.append(sandbox.call(fail, ExecutionScope(f"f{i}"), {"in": i}))
        else:
            calls.append(probe(sandbox, execution_id=f"g{i}", value=i))
    calls.append(sandbox.call(make_spec(nodes.Sleeper), ExecutionScope(
        "slow", deadline=loop.time() + 1.0), {"in": 1}))
    results = await asyncio.gather(*calls, return_exceptions=True)
    for i, result in enumerate(results[:-1]):
        if i % 3 == 0:
            assert isinstance(result, NodeFailed), result
        else:
            assert isinstance(result, dict) and result["in"] == i, result
    assert isinstance(results[-1], DeadlineExceeded)
    assert (await probe(sandbox, value=9))["in"] == 9
