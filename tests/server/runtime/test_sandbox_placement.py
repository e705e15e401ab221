"""Where the sandbox's processes run (``_placement``): while the sandbox is quiet, the worker of a
short call and the server's threads share the event loop's CPU; an overlap of calls, a long
node, a bound call that turns slow, a busy server, a loop kept waiting for its CPU, an idle
second or the runtime's shutdown lets every one of them go to all the server's CPUs, threads
started while bound included; a launcher started from a bound thread forks its workers onto
all of them; ``co_locate=False`` binds nothing."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tensorline.server._prestart import SERVER_CPUS
from tensorline.server.runtime import ExecutionScope, SandboxRuntime
from tensorline.server.runtime.sandbox import _placement
from tensorline.server.runtime.sandbox._placement import CpuPlacement
from tests.server.runtime import sandbox_nodes as nodes
from tests.server.runtime.conftest import make_spec
from tests.support.polling import eventually

ALL = set(SERVER_CPUS)

needs_two_cpus = pytest.mark.skipif(len(ALL) < 2, reason="binding needs two CPUs or more")


@pytest.fixture
def lenient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call counts as short and the test process as quiet: the thresholds are timings,
    and a loaded test machine must not decide what these tests see."""
    monkeypatch.setattr(_placement, "SHORT_S", 5.0)
    monkeypatch.setattr(_placement, "BIND_BELOW", 100.0)
    monkeypatch.setattr(_placement, "RELEASE_ABOVE", 100.0)


@pytest.fixture
def unbound_after() -> Iterator[None]:
    """Each test leaves this thread (the event loop's) on all the server's CPUs, as it found
    it, and the assertion that it did is the runtime's, not a reset here."""
    assert os.sched_getaffinity(0) == ALL
    yield
    assert os.sched_getaffinity(0) == ALL


async def runtime_for(tmp_path: Path, **options: object) -> SandboxRuntime:
    runtime = SandboxRuntime(workers=2, call_timeout_s=60.0, cpu_seconds=5.0,
                             scratch_root=str(tmp_path / "scratch"), **options)  # type: ignore[arg-type]
    await runtime.start()
    return runtime


@pytest.fixture
async def sandbox(no_leaks: None, unbound_after: None, tmp_path: Path
                  ) -> AsyncIterator[SandboxRuntime]:
    runtime = await runtime_for(tmp_path)
    try:
        yield runtime
    finally:
        await runtime.shutdown()


def thread_affinities(pid: int) -> dict[int, set[int]]:
    return {int(tid): os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


async def echo_calls(runtime: SandboxRuntime, count: int) -> None:
    spec = make_spec(nodes.Echo, trusted=True)
    for i in range(count):
        assert await runtime.call(spec, ExecutionScope(f"e{i}"), {"in": i}) == i


@needs_two_cpus
async def test_a_short_call_on_a_quiet_sandbox_shares_the_loops_cpu(
        lenient: None, sandbox: SandboxRuntime) -> None:
    # The first call of a node is not bound (its duration is unknown); the next ones are.
    await echo_calls(sandbox, 3)
    bound = sandbox._placement.bound
    cpu = sandbox._placement.loop_cpu
    assert bound and cpu is not None and set(bound.values()) == {cpu}
    for pid in sandbox.worker_pids():
        assert os.sched_getaffinity(pid) == ({cpu} if pid in bound else ALL)
    # The loop's thread and the server's other threads are on that CPU too.
    assert os.sched_getaffinity(0) == {cpu}
    assert set(map(frozenset, thread_affinities(os.getpid()).values())) == {frozenset({cpu})}


@needs_two_cpus
async def test_overlapping_calls_let_every_thread_go(lenient: None,
                                                     sandbox: SandboxRuntime) -> None:
    await echo_calls(sandbox, 3)
    cpu = sandbox._placement.loop_cpu
    assert cpu is not None
    # A thread the server starts while bound inherits the binding.
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    assert thread.native_id is not None
    assert os.sched_getaffinity(thread.native_id) == {cpu}
    # Two calls at once: the second starts while the first holds its worker.
    nap = make_spec(nodes.Nap, {"seconds": 0.3}, trusted=True)
    echo = make_spec(nodes.Echo, trusted=True)
    slow = asyncio.ensure_future(sandbox.call(nap, ExecutionScope("nap"), {"in": 1}))
    await eventually(lambda: sandbox._busy == 1, 30.0, "the nap to be in flight")
    assert await sandbox.call(echo, ExecutionScope("quick"), {"in": 2}) == 2
    assert await slow == 1
    assert sandbox._placement.bound == {}
    assert sandbox._placement.loop_cpu is None
    assert all(os.sched_getaffinity(p) == ALL for p in sandbox.worker_pids())
    assert all(mask == ALL for mask in thread_affinities(os.getpid()).values())
    assert os.sched_getaffinity(thread.native_id) == ALL
    stop.set()
    thread.join()


@needs_two_cpus
async def test_a_node_whose_calls_are_long_is_never_bound(
        monkeypatch: pytest.MonkeyPatch, lenient: None, sandbox: SandboxRuntime) -> None:
    monkeypatch.setattr(_placement, "SHORT_S", 0.05)
    nap = make_spec(nodes.Nap, {"seconds": 0.1}, trusted=True)
    for i in range(3):
        assert await sandbox.call(nap, ExecutionScope(f"n{i}"), {"in": i}) == i
    assert sandbox._placement.bound == {}
    assert all(os.sched_getaffinity(p) == ALL for p in sandbox.worker_pids())
    assert os.sched_getaffinity(0) == ALL


@needs_two_cpus
async def test_a_busy_server_binds_nothing(lenient: None, monkeypatch: pytest.MonkeyPatch,
                                           sandbox: SandboxRuntime) -> None:
    await echo_calls(sandbox, 3)
    assert sandbox._placement.bound
    # The server's threads used more than RELEASE_ABOVE of a CPU since the last look (a
    # second ago): the next call lets everything go, and the verdict stands for its window.
    monkeypatch.setattr(_placement, "RELEASE_ABOVE", 0.0)
    monkeypatch.setattr(_placement, "BIND_BELOW", 0.0)
    sandbox._placement._sampled_at = asyncio.get_running_loop().time() - 1.0
    await echo_calls(sandbox, 1)
    assert sandbox._placement.bound == {}
    assert sandbox._placement.loop_cpu is None
    assert os.sched_getaffinity(0) == ALL
    assert all(os.sched_getaffinity(p) == ALL for p in sandbox.worker_pids())


@needs_two_cpus
async def test_co_locate_off_binds_nothing(lenient: None, no_leaks: None, unbound_after: None,
                                           tmp_path: Path) -> None:
    runtime = await runtime_for(tmp_path, co_locate=False)
    try:
        await echo_calls(runtime, 5)
        assert runtime._placement.bound == {}
        assert all(os.sched_getaffinity(p) == ALL for p in runtime.worker_pids())
    finally:
        await runtime.shutdown()


@needs_two_cpus
async def test_shutdown_lets_the_servers_threads_go(lenient: None, no_leaks: None,
                                                    unbound_after: None,
                                                    tmp_path: Path) -> None:
    runtime = await runtime_for(tmp_path)
    try:
        await echo_calls(runtime, 3)
        assert runtime._placement.loop_cpu is not None
        assert os.sched_getaffinity(0) == {runtime._placement.loop_cpu}
    finally:
        await runtime.shutdown()
    # (unbound_after asserts that the loop's thread runs on all CPUs again.)


@needs_two_cpus
async def test_workers_run_on_all_cpus_whatever_thread_started_the_launcher(
        no_leaks: None, tmp_path: Path) -> None:
    # The launcher is started from a thread of the default executor, which may have been
    # created while the loop's thread was bound.
    os.sched_setaffinity(0, {SERVER_CPUS[0]})
    try:
        runtime = await runtime_for(tmp_path, co_locate=False)
    finally:
        os.sched_setaffinity(0, ALL)
    try:
        assert runtime.launcher_pid is not None
        assert os.sched_getaffinity(runtime.launcher_pid) == ALL
        assert runtime.worker_pids()
        assert all(os.sched_getaffinity(p) == ALL for p in runtime.worker_pids())
    finally:
        await runtime.shutdown()


def test_the_server_counts_as_busy_above_its_share_of_a_cpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_time = [0.0]
    monkeypatch.setattr(_placement.time, "process_time", lambda: cpu_time[0])
    placement = CpuPlacement(enabled=False)
    window = _placement.QUIET_S
    assert placement._busy(0.0) is False  # the first look only takes a sample
    # Unbound: busy from BIND_BELOW of a CPU on.
    cpu_time[0] += (_placement.BIND_BELOW + 0.05) * window
    assert placement._busy(window) is True
    cpu_time[0] += (_placement.BIND_BELOW - 0.05) * window
    assert placement._busy(2 * window) is False
    # Within a window the last verdict stands.
    cpu_time[0] += 10 * window
    assert placement._busy(2.5 * window) is False
    # Bound: busy only from RELEASE_ABOVE on (between the two, the binding stays).
    placement._loop_cpu = 0
    cpu_time[0] = 0.0
    placement._sampled_at, placement._cpu_at = 3 * window, 0.0
    cpu_time[0] += (_placement.BIND_BELOW + _placement.RELEASE_ABOVE) / 2 * window
    assert placement._busy(4 * window) is False
    cpu_time[0] += (_placement.RELEASE_ABOVE + 0.05) * window
    assert placement._busy(5 * window) is True


def test_only_a_node_whose_last_call_was_short_is_short() -> None:
    placement = CpuPlacement(enabled=False)
    assert not placement.is_short("Never")
    placement.record("Quick", _placement.SHORT_S / 2)
    placement.record("Slow", _placement.SHORT_S * 2)
    assert placement.is_short("Quick") and not placement.is_short("Slow")
    placement.record("Quick", _placement.SHORT_S * 2)
    assert not placement.is_short("Quick")


@needs_two_cpus
async def test_a_bound_call_that_turns_slow_lets_everything_go(
        lenient: None, monkeypatch: pytest.MonkeyPatch, sandbox: SandboxRuntime) -> None:
    await echo_calls(sandbox, 3)
    assert sandbox._placement.loop_cpu is not None
    # Gate has been quick so far; this call holds its worker until the test opens it.
    monkeypatch.setattr(_placement, "SHORT_S", 0.05)
    gate = make_spec(nodes.Gate, trusted=True)
    sandbox._placement.record(gate.node_type, 0.0)
    await echo_calls(sandbox, 1)  # bound again, and Gate's class loaded in no worker yet
    held = asyncio.ensure_future(sandbox.call(gate, ExecutionScope("held"), {"in": 7}))
    try:
        # Past SHORT_S the loop does not share its CPU with it any longer, while it still runs.
        await eventually(lambda: sandbox._placement.loop_cpu is None
                         and any(Path(view, "held.process").exists()
                                 for view in sandbox.scratch_views()), 30.0,
                         "the held call to let the loop's CPU go")
        assert not held.done()
        assert sandbox._placement.bound == {}
        assert os.sched_getaffinity(0) == ALL
        assert all(os.sched_getaffinity(p) == ALL for p in sandbox.worker_pids())
        assert not sandbox._placement.is_short(gate.node_type)
    finally:
        open_gate(sandbox, "held")
    assert await held == 7


def open_gate(runtime: SandboxRuntime, execution: str) -> None:
    """Let the ``Gate`` call of ``execution`` end (an empty file in each worker's tmpfs)."""
    for view in runtime.scratch_views():
        Path(view, f"{execution}.go").write_text("")


@needs_two_cpus
async def test_a_bound_loop_kept_waiting_for_its_cpu_lets_go_and_backs_off(
        lenient: None, monkeypatch: pytest.MonkeyPatch, sandbox: SandboxRuntime) -> None:
    await echo_calls(sandbox, 3)
    assert sandbox._placement.loop_cpu is not None
    # Any wait for the CPU now counts as contention: the next look (every WATCH_S, no call
    # needed) lets go, and nothing is bound again for BACKOFF_S.
    monkeypatch.setattr(_placement, "CONTENDED_SHARE", -1.0)
    await eventually(lambda: sandbox._placement.loop_cpu is None, 30.0,
                     "the loop to let go of its CPU")
    assert sandbox._placement.bound == {}
    assert os.sched_getaffinity(0) == ALL
    monkeypatch.setattr(_placement, "CONTENDED_SHARE", 100.0)
    await echo_calls(sandbox, 3)
    assert sandbox._placement.loop_cpu is None


def test_contention_counts_only_while_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    delay = [0]
    monkeypatch.setattr(_placement.time, "process_time", lambda: 0.0)
    monkeypatch.setattr(_placement, "_run_delay", lambda: delay[0])
    placement = CpuPlacement(enabled=False)
    window = 1.0  # seconds between looks (more than QUIET_S: each look takes a sample)
    assert placement._busy(0.0) is False
    delay[0] += int(window * 1e9)  # waited the whole window: unbound, it does not count
    assert placement._busy(window) is False
    placement._loop_cpu = 0
    delay[0] += int((_placement.CONTENDED_SHARE - 0.05) * window * 1e9)
    assert placement._busy(2 * window) is False
    delay[0] += int((_placement.CONTENDED_SHARE + 0.05) * window * 1e9)
    assert placement._busy(3 * window) is True
    assert placement._backoff_until == 3 * window + _placement.BACKOFF_S


@needs_two_cpus
async def test_an_idle_sandbox_lets_everything_go(lenient: None, monkeypatch: pytest.MonkeyPatch,
                                                  sandbox: SandboxRuntime) -> None:
    monkeypatch.setattr(_placement, "IDLE_S", 0.2)
    await echo_calls(sandbox, 3)
    assert sandbox._placement.loop_cpu is not None
    await eventually(lambda: sandbox._placement.loop_cpu is None, 30.0,
                     "the idle loop to let go of its CPU")
    assert sandbox._placement.bound == {}
    assert sandbox._placement._watch is None
    assert os.sched_getaffinity(0) == ALL
    # The next calls bind again.
    await echo_calls(sandbox, 2)
    assert sandbox._placement.loop_cpu is not None


@needs_two_cpus
async def test_a_stateful_node_keeps_its_binding_across_its_requests(
        lenient: None, monkeypatch: pytest.MonkeyPatch, sandbox: SandboxRuntime) -> None:
    # Each call of Marker sends three requests (initialize, process, and its cleanup with the
    # next); only "process" is a timed call. Once bound, none of them moves anything.
    marker = make_spec(nodes.Marker, trusted=True)

    async def calls(count: int) -> None:
        for i in range(count):
            assert await sandbox.call(marker, ExecutionScope(f"m{i}"), {"in": i}) == i

    await calls(3)
    assert sandbox._placement.loop_cpu is not None and sandbox._placement.bound
    moves: list[int] = []
    place = os.sched_setaffinity
    monkeypatch.setattr(_placement.os, "sched_setaffinity",
                        lambda tid, cpus: (moves.append(tid), place(tid, cpus)))
    await calls(5)
    assert moves == []
    assert sandbox._placement.loop_cpu is not None


@needs_two_cpus
async def test_a_long_initialize_on_a_bound_worker_lets_everything_go(
        lenient: None, monkeypatch: pytest.MonkeyPatch, sandbox: SandboxRuntime) -> None:
    await echo_calls(sandbox, 3)
    assert sandbox._placement.loop_cpu is not None
    monkeypatch.setattr(_placement, "SHORT_S", 0.05)
    # SlowInit's initialize sleeps 0.5 s on the worker the echoes left bound.
    slow = asyncio.ensure_future(sandbox.call(make_spec(nodes.SlowInit, trusted=True),
                                              ExecutionScope("slow"), {"in": 3}))
    await eventually(lambda: sandbox._placement.loop_cpu is None, 30.0,
                     "the initialize to let the loop's CPU go")
    assert not slow.done()
    assert sandbox._placement.bound == {}
    assert await slow == 3


def test_waiting_for_the_loops_own_bound_worker_is_no_contention(
        monkeypatch: pytest.MonkeyPatch) -> None:
    delay = [0]
    monkeypatch.setattr(_placement.time, "process_time", lambda: 0.0)
    monkeypatch.setattr(_placement, "_run_delay", lambda: delay[0])
    placement = CpuPlacement(enabled=False)
    placement._loop_cpu = 0
    assert placement._busy(0.0) is False
    # The loop waited 90% of the window, while its bound requests ran for 80% of it.
    delay[0] += int(0.9e9)
    placement.bound_request_ended(0.8)
    assert placement._busy(1.0) is False
    # The same wait with no bound request in flight is contention.
    delay[0] += int(0.9e9)
    assert placement._busy(2.0) is True
