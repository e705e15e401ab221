"""``SandboxRuntime.call_batch``: a one-shot node runs several input sets in one ``runs``
request, in order, on one worker; a failure or a cancellation ends the batch at its own input
set with the values before it, and nothing after it runs; a worker that dies in a batch loses
the values it had not reported, and the failure says how many input sets it may belong to; each
input set has its own deadline; a batch holds its worker for one turn, the rest waits for the
next; a worker that reports more values than are left, or ends a batch before anything ran, is
killed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tensorline.server._errors import DeadlineExceeded, NodeFailed
from tensorline.server.runtime import BatchOutcome, ExecutionScope, SandboxRuntime, WorkerFailure
from tensorline.wire._values import Json
from tests.server.runtime import sandbox_nodes as nodes
from tests.server.runtime.conftest import TEST_NODES, make_spec
from tests.support.polling import eventually

STEP = make_spec(nodes.Step)


@pytest.fixture
async def single(no_leaks: None, tmp_path: Path) -> AsyncIterator[SandboxRuntime]:
    """One worker for the test nodes' domain, so that its run count tells what ran."""
    runtime = SandboxRuntime(workers=1, max_workers=1, domains=[TEST_NODES],
                             workers_per_domain=1, cpu_seconds=5.0, call_timeout_s=2.0,
                             scratch_root=str(tmp_path / "scratch"), cancel_grace_s=10.0)
    await runtime.start()
    try:
        # The module's first call goes the general way (it imports the module there).
        await runtime.call(STEP, ExecutionScope("warm"), {"in": "warm"})
        yield runtime
    finally:
        await runtime.shutdown()


def steps(values: list[Any]) -> list[tuple[int, str]]:
    out = []
    for value in values:
        assert isinstance(value, Json)
        out.append((value.value["step"], value.value["in"]))
    return out


async def last_step(runtime: SandboxRuntime) -> int:
    """The worker's run count, counting this call."""
    out = await runtime.call(STEP, ExecutionScope("count"), {"in": "count"})
    assert isinstance(out, Json)
    return int(out.value["step"])


async def batch(runtime: SandboxRuntime, *actions: str,
                execution_id: str = "b") -> BatchOutcome:
    return await runtime.call_batch(STEP, ExecutionScope(execution_id),
                                    [{"in": a} for a in actions])


async def test_a_batch_runs_in_order_in_one_request(single: SandboxRuntime) -> None:
    before = single.stats()
    start = await last_step(single)
    values, failure, _ = await batch(single, *"abcdef")
    assert failure is None
    assert steps(values) == [(start + 1 + i, a) for i, a in enumerate("abcdef")]
    after = single.stats()
    assert after["batches"] - before["batches"] == 1
    assert after["batched_inputs"] - before["batched_inputs"] == 6
    assert len({v.value["pid"] for v in values}) == 1


async def test_a_failure_ends_the_batch_after_the_values_before_it(
        single: SandboxRuntime) -> None:
    start = await last_step(single)
    values, failure, span = await batch(single, "a", "b", "fail", "never", "never")
    assert steps(values) == [(start + 1, "a"), (start + 2, "b")]
    assert isinstance(failure, NodeFailed) and span == 1
    assert failure.exc_type == "ValueError" and f"step {start + 3} failed" in failure.detail
    # Nothing after the failure ran.
    assert await last_step(single) == start + 4


async def test_a_crash_ends_the_batch_and_the_pool_recovers(single: SandboxRuntime) -> None:
    restarts = single.stats()["worker_restarts"]
    # "nap" takes longer than a report interval: its value is reported before the crash.
    values, failure, span = await batch(single, "a", "nap:0.05", "crash", "never")
    assert [v for _, v in steps(values)] == ["a", "nap:0.05"]
    assert isinstance(failure, WorkerFailure) and failure.kind == "crash"
    assert span == 2  # "crash" or "never": the dead worker cannot say
    assert single.stats()["worker_restarts"] == restarts + 1
    values, failure, _ = await batch(single, "x", "y")
    assert failure is None and [v for _, v in steps(values)] == ["x", "y"]


async def test_a_crash_loses_only_what_was_not_reported(single: SandboxRuntime) -> None:
    values, failure, span = await batch(single, "a", "crash", "never")
    assert isinstance(failure, WorkerFailure) and failure.kind == "crash"
    assert len(values) + span == 3 and len(values) <= 1


async def test_each_input_set_has_its_own_deadline(single: SandboxRuntime) -> None:
    # call_timeout_s is 2 s: five naps of 0.6 s (3 s in all) pass, each within its own 2 s.
    values, failure, _ = await batch(single, *["nap:0.6"] * 5)
    assert failure is None and len(values) == 5
    # An input set that overruns its own deadline is stopped there, after those before it.
    start = await last_step(single)
    values, failure, span = await batch(single, "nap:0.6", "nap:30", "never")
    assert steps(values) == [(start + 1, "nap:0.6")]
    assert isinstance(failure, DeadlineExceeded) and span == 2
    values, failure, _ = await batch(single, "x", "y")
    assert failure is None and len(values) == 2


async def test_a_cancelled_batch_stops_before_its_next_input_set(single: SandboxRuntime) -> None:
    pids = single.worker_pids()
    restarts = single.stats()["worker_restarts"]
    start = await last_step(single)
    task = asyncio.ensure_future(batch(single, "a", "wait", "never", "never",
                                       execution_id="cancelled"))
    await eventually(lambda: any(Path(v, "cancelled.process").exists()
                                 for v in single.scratch_views()), what="the waiting step")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The worker stopped the batch and serves on: the same process, and the input sets after
    # the cancelled one never ran.
    assert await last_step(single) == start + 3
    assert single.worker_pids() == pids
    assert single.stats()["worker_restarts"] == restarts


@pytest.mark.parametrize(("actions", "reported"), [
    (("forge:0", "never"), []),  # an empty report before anything ran
    (("nap:0.05", "forge:9", "never"), ["nap:0.05"]),  # more values than the batch has left
])
async def test_a_batch_report_with_other_than_what_ran_kills_the_worker(
        single: SandboxRuntime, actions: tuple[str, ...], reported: list[str]) -> None:
    """A report carries no more values than the batch has left, and the batch's last one
    follows at least one value (an empty report ends a batch's turn, see below)."""
    restarts = single.stats()["worker_restarts"]
    values, failure, span = await batch(single, *actions)
    assert [v for _, v in steps(values)] == reported
    assert isinstance(failure, WorkerFailure) and failure.kind == "protocol"
    assert span == len(actions) - len(reported)
    await eventually(lambda: single.stats()["worker_restarts"] == restarts + 1,
                     what="the worker to be replaced")


async def test_a_single_input_set_and_a_node_with_a_timeout_take_single_calls(
        single: SandboxRuntime) -> None:
    before = single.stats()["batches"]
    values, failure, _ = await batch(single, "a")
    assert failure is None and len(values) == 1
    timed = make_spec(nodes.Step, timeout_s=5.0)
    values, failure, _ = await single.call_batch(timed, ExecutionScope("t"),
                                                 [{"in": "a"}, {"in": "b"}])
    assert failure is None and [v for _, v in steps(values)] == ["a", "b"]
    assert single.stats()["batches"] == before


async def test_a_hosted_instance_runs_batches_and_comes_back_after_a_crash(
        single: SandboxRuntime) -> None:
    """An instance with an ``initialize`` lives in its worker: a batch is one ``calls``
    request to it; after its worker died, the next batch creates it again elsewhere."""
    spec = make_spec(nodes.HostedStep)
    instance = await single.acquire(spec, ExecutionScope("hosted"))
    try:
        assert instance.batches
        before = single.stats()
        values, failure, _ = await instance.process_batch([{"in": a} for a in "abc"])
        assert failure is None and [v for _, v in steps(values)] == ["a", "b", "c"]
        assert single.stats()["batches"] == before["batches"] + 1
        values, failure, span = await instance.process_batch(
            [{"in": a} for a in ("x", "nap:0.05", "fail", "never")])
        assert [v for _, v in steps(values)] == ["x", "nap:0.05"]
        assert isinstance(failure, NodeFailed) and span == 1
        values, failure, span = await instance.process_batch(
            [{"in": a} for a in ("nap:0.05", "crash", "never")])
        assert [v for _, v in steps(values)] == ["nap:0.05"]
        assert isinstance(failure, WorkerFailure) and failure.kind == "crash" and span == 2
        values, failure, _ = await instance.process_batch([{"in": a} for a in "de"])
        assert failure is None and [v for _, v in steps(values)] == ["d", "e"]
    finally:
        await single.release(instance)


@pytest.mark.parametrize("hosted", [False, True])
async def test_a_batch_holds_its_worker_for_one_turn(single: SandboxRuntime,
                                                     hosted: bool) -> None:
    """Past BATCH_TURN_S (5 ms) no input set starts: the worker hands the rest back and it
    runs in later turns, in order, with nothing lost or run twice (a one-shot node's ``runs``
    and a hosted instance's ``calls`` alike)."""
    actions = ["nap:0.01"] * 4 + ["a", "b"]
    batch = [{"in": a} for a in actions]
    start = await last_step(single)
    before = single.stats()["batches"]
    if hosted:
        instance = await single.acquire(make_spec(nodes.HostedStep), ExecutionScope("turns"))
        try:
            values, failure, _ = await instance.process_batch(batch)
        finally:
            await single.release(instance)
    else:
        values, failure, _ = await single.call_batch(STEP, ExecutionScope("turns"), batch)
    assert failure is None
    assert steps(values) == [(start + 1 + i, a) for i, a in enumerate(actions)]
    # 10 ms each: one nap per turn, then the quick ones together.
    assert single.stats()["batches"] - before >= 4
