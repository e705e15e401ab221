"""Gathering (``sandbox._gather``): while sandboxed calls overlap, calls of a short one-shot node
wait ``batch_wait_s`` and go to one worker as one ``runs`` request, each input set with its own
node and execution id; a failing call fails alone and the calls after it still run; when the
worker dies in a batch the unanswered calls run again one by one, so only the one that kills a
worker fails; a call cancelled while it waits leaves the batch; calls that do not overlap, or a
wait of 0, are never gathered; calls still waiting at shutdown fail as refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tensorline.server._errors import NodeFailed, ServiceUnavailable
from tensorline.server.runtime import ExecutionScope, SandboxRuntime, WorkerFailure
from tensorline.server.runtime.sandbox import _gather, _placement
from tensorline.wire._values import Json
from tests.server.runtime import sandbox_nodes as nodes
from tests.server.runtime.conftest import TEST_NODES, make_spec
from tests.support.polling import eventually

WHOSE = make_spec(nodes.WhoseStep, node_id="whose")
# Long enough that every call a test starts together joins the batch, whatever the machine.
WAIT_S = 0.3


def runtime_with(tmp_path: Path, batch_wait_s: float, max_workers: int = 1) -> SandboxRuntime:
    """One worker for the test nodes' domain: overlapping calls queue for it."""
    return SandboxRuntime(workers=1, max_workers=max_workers, domains=[TEST_NODES],
                          workers_per_domain=1, cpu_seconds=5.0, call_timeout_s=5.0,
                          batch_wait_s=batch_wait_s, scratch_root=str(tmp_path / "scratch"))


@pytest.fixture
def short(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every node counts as short (its calls take under a second), however slow the machine."""
    monkeypatch.setattr(_placement, "SHORT_S", 1.0)


@pytest.fixture
def patient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls wait the whole wait, even while the event loop idles."""
    monkeypatch.setattr(_gather, "IDLE_SHARE", 0.0)


@pytest.fixture
async def gathering(no_leaks: None, short: None, tmp_path: Path
                    ) -> AsyncIterator[SandboxRuntime]:
    runtime = runtime_with(tmp_path, WAIT_S)
    await runtime.start()
    try:
        # The module's first call goes the general way (it imports the module there); the
        # second records how long the node's calls take.
        for _ in range(2):
            await runtime.call(WHOSE, ExecutionScope("warm"), {"in": "warm"})
        yield runtime
    finally:
        await runtime.shutdown()


def call(runtime: SandboxRuntime, action: str, execution_id: str) -> asyncio.Task[Any]:
    return asyncio.ensure_future(runtime.call(WHOSE, ExecutionScope(execution_id), {"in": action}))


async def behind_a_busy_worker(runtime: SandboxRuntime, actions: list[str],
                               ) -> tuple[asyncio.Task[Any], list[asyncio.Task[Any]]]:
    """A call that holds the one worker for a while, and calls started while it runs (so they
    overlap it): ``e0``, ``e1``... their execution ids."""
    holder = call(runtime, "nap:0.6", "holder")
    await eventually(lambda: runtime._busy > 0)
    return holder, [call(runtime, action, f"e{i}") for i, action in enumerate(actions)]


def whose(value: Any) -> tuple[int, int, str, str, str]:
    assert isinstance(value, Json)
    v = value.value
    return v["step"], v["pid"], v["in"], v["node"], v["execution"]


async def test_overlapping_calls_share_one_request_each_with_its_own_ids(
        gathering: SandboxRuntime) -> None:
    before = gathering.stats()
    holder, calls = await behind_a_busy_worker(gathering, list("abcde"))
    await holder
    results = [whose(v) for v in await asyncio.gather(*calls)]
    after = gathering.stats()
    assert after["gathered_calls"] - before["gathered_calls"] == 5
    assert after["batches"] - before["batches"] == 1
    assert after["batched_inputs"] - before["batched_inputs"] == 5
    # In the order they came, one after the other in one worker, each with its own ids.
    first = results[0][0]
    assert [(s - first, a, n, e) for s, _, a, n, e in results] == [
        (i, a, "whose", f"e{i}") for i, a in enumerate("abcde")]
    assert len({pid for _, pid, *_ in results}) == 1


async def test_a_failing_call_fails_alone_and_the_calls_after_it_still_run(
        gathering: SandboxRuntime) -> None:
    holder, calls = await behind_a_busy_worker(gathering, ["a", "fail", "c", "d"])
    await holder
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(outcomes[1], NodeFailed)
    assert "whose" in str(outcomes[1])
    assert [whose(outcomes[i])[2:] for i in (0, 2, 3)] == [
        ("a", "whose", "e0"), ("c", "whose", "e2"), ("d", "whose", "e3")]


async def test_a_call_that_kills_the_worker_fails_alone(gathering: SandboxRuntime) -> None:
    holder, calls = await behind_a_busy_worker(gathering, ["a", "crash", "c", "d"])
    await holder
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(outcomes[1], WorkerFailure)
    assert [whose(outcomes[i])[2:] for i in (0, 2, 3)] == [
        ("a", "whose", "e0"), ("c", "whose", "e2"), ("d", "whose", "e3")]


async def test_a_call_cancelled_while_it_waits_leaves_the_batch(
        gathering: SandboxRuntime, patient: None) -> None:
    before = gathering.stats()
    holder, calls = await behind_a_busy_worker(gathering, ["a", "b", "c"])
    await asyncio.sleep(0)
    calls[1].cancel()
    await holder
    results = await asyncio.gather(calls[0], calls[2])
    assert [whose(v)[2:] for v in results] == [("a", "whose", "e0"), ("c", "whose", "e2")]
    with pytest.raises(asyncio.CancelledError):
        await calls[1]
    after = gathering.stats()
    assert after["batched_inputs"] - before["batched_inputs"] == 2


async def test_calls_one_after_another_are_not_gathered(gathering: SandboxRuntime) -> None:
    await asyncio.sleep(0.06)  # past the load the fixture's own calls may have left
    before = gathering.stats()
    for i in range(5):
        assert whose(await gathering.call(WHOSE, ExecutionScope(f"s{i}"), {"in": "x"}))[4] == \
            f"s{i}"
    assert gathering.stats()["gathered_calls"] == before["gathered_calls"]


async def test_a_wait_of_zero_never_gathers(no_leaks: None, short: None,
                                            tmp_path: Path) -> None:
    runtime = runtime_with(tmp_path, 0.0)
    await runtime.start()
    try:
        await runtime.call(WHOSE, ExecutionScope("warm"), {"in": "warm"})
        holder, calls = await behind_a_busy_worker(runtime, list("abc"))
        await holder
        assert [whose(v)[2] for v in await asyncio.gather(*calls)] == list("abc")
        assert runtime.stats()["gathered_calls"] == 0
        assert runtime.stats()["batches"] == 0
    finally:
        await runtime.shutdown()


async def test_calls_still_waiting_at_shutdown_are_refused(no_leaks: None, short: None,
                                                           patient: None,
                                                           tmp_path: Path) -> None:
    runtime = runtime_with(tmp_path, 30.0)
    await runtime.start()
    try:
        await runtime.call(WHOSE, ExecutionScope("warm"), {"in": "warm"})
        holder, calls = await behind_a_busy_worker(runtime, ["a", "b"])
        await holder
    finally:
        await runtime.shutdown()
    for task in calls:
        with pytest.raises(ServiceUnavailable):
            await task


async def test_calls_behind_a_stalled_one_run_elsewhere(no_leaks: None, short: None,
                                                       tmp_path: Path) -> None:
    """A gathered call that takes far longer than the node's calls do does not hold the calls
    after it: the batch's unanswered calls run alone meanwhile (the slow one on a worker of its
    own, the others on a third)."""
    runtime = runtime_with(tmp_path, WAIT_S, max_workers=3)
    await runtime.start()
    try:
        for _ in range(2):
            await runtime.call(WHOSE, ExecutionScope("warm"), {"in": "warm"})
        holder, calls = await behind_a_busy_worker(runtime, ["a", "nap:3", "c", "d"])
        first, slow, *after = calls
        assert whose(await first)[2:] == ("a", "whose", "e0")
        done, _ = await asyncio.wait(after, timeout=2.5)
        assert done == set(after), "the calls after the stalled one waited for it"
        assert not slow.done()
        assert [whose(t.result())[2:] for t in after] == [("c", "whose", "e2"),
                                                          ("d", "whose", "e3")]
        assert whose(await slow)[2] == "nap:3"
        await holder
    finally:
        await runtime.shutdown()


def marked(runtime: SandboxRuntime, execution_id: str) -> bool:
    """The ``wait`` action of the node has started for ``execution_id``."""
    return any(Path(view, f"{execution_id}.process").exists()
               for view in runtime.scratch_views())


async def test_cancelling_the_call_a_batch_runs_reaches_the_node_and_the_rest_still_run(
        gathering: SandboxRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gather, "STALL_S", 60.0)  # the cancellation, not a stall, stops it
    restarts = gathering.stats()["worker_restarts"]
    holder, calls = await behind_a_busy_worker(gathering, ["a", "wait", "c"])
    await holder
    await eventually(lambda: marked(gathering, "e1"), 20.0, "the waiting call to start")
    calls[1].cancel()
    # The node sees the cancellation and returns; the batch stops there, and the calls before
    # and after it get their values (without the worker's deadline, which would kill it).
    assert whose(await calls[0])[2:] == ("a", "whose", "e0")
    assert whose(await calls[2])[2:] == ("c", "whose", "e2")
    with pytest.raises(asyncio.CancelledError):
        await calls[1]
    assert gathering.stats()["worker_restarts"] == restarts


async def test_calls_are_sent_once_the_event_loop_idles_not_after_the_whole_wait(
        no_leaks: None, short: None, tmp_path: Path) -> None:
    """Nothing else runs on the loop while the calls wait (no request could bring another call):
    they are sent then, not after the 30 s wait."""
    runtime = runtime_with(tmp_path, 30.0)
    await runtime.start()
    try:
        await runtime.call(WHOSE, ExecutionScope("warm"), {"in": "warm"})
        before = runtime.stats()
        holder, calls = await behind_a_busy_worker(runtime, list("abc"))
        done, _ = await asyncio.wait(calls, timeout=10)
        assert done == set(calls)
        assert [whose(t.result())[2] for t in calls] == list("abc")
        assert runtime.stats()["batched_inputs"] - before["batched_inputs"] == 3
        await holder
    finally:
        await runtime.shutdown()
