"""The sandboxed runtime, driven with real worker processes: transfer, warm instances, cleanup,
crashes, deadlines and escape attempts. Each test ends without stray workers or segments."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from tensorline.server._errors import DeadlineExceeded, LimitExceeded, NodeFailed
from tensorline.server.manifest import NodeSpec
from tensorline.server.runtime import ExecutionScope, SandboxRuntime, WorkerFailure
from tensorline.server.runtime.sandbox import SandboxInstance
from tensorline.wire._values import Audio, Json, Tagged
from tests.server.runtime import sandbox_nodes as nodes
from tests.server.runtime.conftest import make_spec
from tests.support.polling import eventually
from tests.support.processes import wait_until

REPO = Path(__file__).resolve().parents[3]


async def run_once(runtime: SandboxRuntime, cls: type[nodes.Node], inputs: Mapping[str, Any],
                   params: dict[str, Any] | None = None, *, execution_id: str = "x",
                   deadline: float | None = None) -> Any:
    spec = make_spec(cls, params)
    instance = await runtime.acquire(spec, ExecutionScope(execution_id, deadline=deadline))
    try:
        return await instance.process(inputs)
    finally:
        await runtime.release(instance)


async def assert_serving(runtime: SandboxRuntime) -> None:
    """The next request succeeds after whatever went wrong before."""
    data = np.arange(300, dtype=np.int32)
    out = await run_once(runtime, nodes.Echo, {"in": data}, execution_id="after")
    assert np.array_equal(out, data)
    baseline = runtime.workers + runtime.workers_per_domain * len(runtime.domains)
    await eventually(lambda: len(runtime.worker_pids()) >= baseline, 20.0,
                     "the pool to be refilled")
    assert runtime.healthy()


def random_array(dtype: str, count: int, seed: int = 0) -> np.ndarray:
    dt = np.dtype(dtype)
    raw = np.random.default_rng(seed).bytes(count * dt.itemsize)
    if dt.kind == "b":
        return np.frombuffer(raw, np.uint8).astype(bool)
    return np.frombuffer(raw, dt).copy()


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes())


# --- transfer -------------------------------------------------------------------------------

DTYPES = ["bool", "i1", "u2", "<i4", "<i8", ">f4", "<f2", "<f4", "<f8", "<c8", "<c16"]


@pytest.mark.parametrize("dtype", DTYPES)
async def test_round_trip_is_bit_exact_for_dtypes(sandbox: SandboxRuntime, dtype: str) -> None:
    spec = make_spec(nodes.Echo)
    instance = await sandbox.acquire(spec, ExecutionScope("dtypes"))
    try:
        for count in (0, 1, 255, 1 << 10, (1 << 20) // np.dtype(dtype).itemsize):
            data = random_array(dtype, count, seed=count)
            out = await instance.process({"in": data})
            assert same(out, data), (dtype, count)
    finally:
        await sandbox.release(instance)


async def test_round_trip_64_mib(sandbox: SandboxRuntime) -> None:
    data = random_array("<f4", (64 << 20) // 4, seed=7).reshape(4096, -1)
    out = await run_once(sandbox, nodes.Echo, {"in": data})
    assert same(out, data)
    assert out.flags.writeable  # the server's copy, not a view of a reused segment


async def test_layouts_and_value_kinds_survive(sandbox: SandboxRuntime) -> None:
    big = random_array("<f8", 200_000, seed=3)
    fortran = np.asfortranarray(random_array("<i4", 64 * 512, seed=4).reshape(64, 512))
    values: dict[str, Any] = {
        "in": [
            fortran,
            big[::3],  # not contiguous
            np.array(3.5, dtype=np.float32),  # 0-d
            Json({"a": [1, 2, {"b": None}], "c": "ü"}),
            "text ✓",
            "x" * (1 << 20),  # spills past the control message size
            b"\x00\x01" * 100,
            bytes(range(256)) * 8192,  # 2 MiB of bytes through the segment
            Tagged(big, {"k": "v"}),
        ],
        "many": [np.arange(5), np.arange(70_000, dtype=np.uint8)],
    }
    values["in"].append(Audio(random_array("<i2", 48_000, seed=5), 48_000))
    out = await run_once(sandbox, nodes.Identity, values)
    got, want = out["in"], values["in"]
    assert same(got[0], fortran) and got[0].flags.f_contiguous
    assert same(got[1], big[::3])
    assert same(got[2], want[2])
    assert got[3] == want[3]
    assert got[4:8] == want[4:8]
    assert same(got[8].value, big) and got[8].metadata == {"k": "v"}
    assert got[9].sample_rate == 48_000 and same(got[9].samples, want[9].samples)
    assert all(same(g, w) for g, w in zip(out["many"], values["many"], strict=True))


async def test_async_node_methods(sandbox: SandboxRuntime) -> None:
    data = np.arange(10_000, dtype=np.float64)
    out = await run_once(sandbox, nodes.AsyncDouble, {"in": data})
    assert np.array_equal(out, data * 2)


async def test_nodes_may_use_threads(sandbox: SandboxRuntime) -> None:
    data = np.arange(30_000, dtype=np.int64)
    out = await run_once(sandbox, nodes.Threaded, {"in": data})
    assert np.array_equal(out, data * 2 + 1)


async def test_concurrent_calls_share_the_pool(sandbox: SandboxRuntime) -> None:
    async def one(i: int) -> None:
        data = random_array("<f4", 1000 + i * 5000, seed=i)
        assert same(await run_once(sandbox, nodes.Echo, {"in": data},
                                   execution_id=f"c{i}"), data)

    await asyncio.gather(*(one(i) for i in range(12)))


# --- instances ------------------------------------------------------------------------------


async def test_reusable_node_initializes_once_per_worker(sandbox: SandboxRuntime) -> None:
    reports = []
    for i in range(6):
        reports.append((await run_once(sandbox, nodes.WarmCounter, {"in": "x"},
                                       execution_id=f"w{i}")).value)
    assert {r["inits"] for r in reports} == {1}
    assert [r["calls"] for r in reports] == list(range(1, 7))

    # Concurrent users: each worker initializes it at most once.
    results = await asyncio.gather(*(run_once(sandbox, nodes.WarmCounter, {"in": "x"},
                                              execution_id=f"p{i}") for i in range(8)))
    per_pid: dict[int, set[int]] = {}
    for r in results:
        per_pid.setdefault(r.value["pid"], set()).add(r.value["inits"])
    assert all(inits == {1} for inits in per_pid.values())


def markers(runtime: SandboxRuntime, execution_id: str) -> set[str]:
    return {p.name.split(".", 1)[1] for view in runtime.scratch_views()
            for p in Path(view).glob(f"{execution_id}.*")}


async def test_cleanup_runs_after_a_node_error(sandbox: SandboxRuntime) -> None:
    with pytest.raises(NodeFailed) as err:
        await run_once(sandbox, nodes.Marker, {"in": 1}, {"mode": "fail"}, execution_id="e1")
    assert err.value.node_id == "n1" and err.value.exc_type == "ValueError"
    assert "bad value" in err.value.message
    # Release does not wait for the cleanup: it runs in the worker right after.
    await eventually(lambda: "cleanup" in markers(sandbox, "e1"), 20.0, "cleanup to run")
    assert markers(sandbox, "e1") == {"initialize", "process", "cleanup"}


async def test_initialize_errors_are_classified(sandbox: SandboxRuntime) -> None:
    with pytest.raises(NodeFailed, match="cannot initialize"):
        await sandbox.acquire(make_spec(nodes.FailingInit), ExecutionScope("i1"))
    require_layer(sandbox, "seccomp")
    with pytest.raises(WorkerFailure) as blocked:
        await sandbox.acquire(make_spec(nodes.BlockedInit), ExecutionScope("i2"))
    assert blocked.value.during == "initialize" and blocked.value.kind == "permission"
    # A denial is never undone by running the node in the server.
    assert "PermissionError" in blocked.value.cause and not blocked.value.fallback_eligible
    with pytest.raises(WorkerFailure) as crashed:
        await sandbox.acquire(make_spec(nodes.CrashInit), ExecutionScope("i3"))
    assert crashed.value.during == "initialize" and "SIGSEGV" in crashed.value.cause
    assert not crashed.value.fallback_eligible
    await assert_serving(sandbox)


async def test_cleanup_runs_after_cancellation(sandbox: SandboxRuntime) -> None:
    spec = make_spec(nodes.Marker, {"mode": "sleep"})
    instance = await sandbox.acquire(spec, ExecutionScope("e2"))
    task = asyncio.ensure_future(instance.process({"in": 1}))
    await eventually(lambda: "process" in markers(sandbox, "e2"), 20.0, "process to start")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await sandbox.release(instance)
    await eventually(lambda: "cleanup" in markers(sandbox, "e2"), 20.0, "cleanup to run")
    assert markers(sandbox, "e2") == {"initialize", "process", "cancelled", "cleanup"}
    await assert_serving(sandbox)


async def cancel_mid_process(sandbox: SandboxRuntime, spec: NodeSpec, execution: str) -> None:
    """Cancel a call while the node runs; the node must see ``cancelled`` and clean up."""
    instance = await sandbox.acquire(spec, ExecutionScope(execution))
    task = asyncio.ensure_future(instance.process({"in": 1}))
    await eventually(lambda: "process" in markers(sandbox, execution), 20.0, "process")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await sandbox.release(instance)
    await eventually(lambda: "cleanup" in markers(sandbox, execution), 20.0, "cleanup")
    assert "cancelled" in markers(sandbox, execution)


async def test_cancellation_reaches_the_node_every_time(sandbox: SandboxRuntime) -> None:
    """The node sees ``cancelled`` (the worker is not killed for it), however the signal lands."""
    restarts = sandbox.stats()["worker_restarts"]
    for i in range(25):
        await cancel_mid_process(sandbox, make_spec(nodes.Marker, {"mode": "sleep"}), f"c{i}")
    assert sandbox.stats()["worker_restarts"] == restarts


async def test_a_suspended_async_call_is_cancelled_in_its_worker(sandbox: SandboxRuntime) -> None:
    """An async process suspended in the worker gets CancelledError (its worker is not killed),
    and the next calls on those workers still have a working asyncio.timeout."""
    restarts = sandbox.stats()["worker_restarts"]
    for i in range(4):
        await cancel_mid_process(sandbox, make_spec(nodes.AsyncMarker, {"mode": "block"}),
                                 f"a{i}")
    # Two at once: one per worker of the domain.
    outs = await asyncio.gather(*(run_once(sandbox, nodes.AsyncMarker, {"in": 1},
                                           {"mode": "timeout"}) for _ in range(2)))
    assert all(isinstance(out, Json) for out in outs)
    assert [out.value["timed_out"] for out in outs] == [True, True]
    assert [out.value["cancelling"] for out in outs] == [0, 0]
    assert sandbox.stats()["worker_restarts"] == restarts
    assert await run_once(sandbox, nodes.AsyncMarker, {"in": 7}) == 7


@pytest.mark.parametrize("lazy", [False, True])
async def test_idle_instance_survives_its_worker_dying(sandbox: SandboxRuntime,
                                                       lazy: bool) -> None:
    if lazy:
        # Once every worker has imported the node's module, a node without initialize() is
        # created by its first call.
        for i in range(4):
            assert await run_once(sandbox, nodes.Echo, {"in": i}) == i
    # Not one-shot (it has a cleanup): a stream session holds an instance of it.
    spec = make_spec(nodes.CleanupOnly)
    instance = await sandbox.acquire(spec, ExecutionScope("idle"))
    assert isinstance(instance, SandboxInstance)
    assert instance.initialized is not lazy
    try:
        dying = instance.worker
        os.kill(dying.pid or 0, signal.SIGKILL)
        await eventually(lambda: not dying.alive, 20.0, "the worker to die")
        assert await instance.process({"in": "still here"}) == "still here"
        assert await instance.process({"in": "twice"}) == "twice"
    finally:
        await sandbox.release(instance)


# --- crashes and limits ---------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "cause", "fallback"), [
    (nodes.Segfault, "worker killed by signal 11 (SIGSEGV)", False),
    (nodes.KillSelf, "worker killed by signal 9 (SIGKILL)", False),
    (nodes.CpuLoop, "CPU time limit exceeded (SIGXCPU)", False),
    (nodes.MemoryHog, "memory limit 256 MiB exceeded", False),
])
async def test_crash_fails_only_that_call(sandbox: SandboxRuntime, cls: type[nodes.Node],
                                         cause: str, fallback: bool) -> None:
    bystander = await sandbox.acquire(make_spec(nodes.Echo, node_id="b"),
                                      ExecutionScope("bystander"))
    try:
        with pytest.raises(WorkerFailure) as err:
            await run_once(sandbox, cls, {"in": 1}, execution_id="crash")
        assert err.value.node_id == "n1" and err.value.during == "process"
        assert cause in err.value.cause
        assert err.value.fallback_eligible is fallback
        await assert_serving(sandbox)
        # (a worker retired after a MemoryError ends once idle)
        await eventually(lambda: sandbox.stats()["worker_restarts"] >= 1, 20.0, "a restart")
        assert await bystander.process({"in": "ok"}) == "ok"
    finally:
        await sandbox.release(bystander)


async def test_deadline_kills_and_replaces_the_worker(sandbox: SandboxRuntime) -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(DeadlineExceeded, match="node 'n1'"):
        await run_once(sandbox, nodes.Sleeper, {"in": 1}, deadline=loop.time() + 0.5)
    await assert_serving(sandbox)


async def test_a_shorter_deadline_after_long_ones_is_enforced(sandbox: SandboxRuntime) -> None:
    """Workers keep one deadline timer across calls: a call due before it must still be cut."""
    loop = asyncio.get_running_loop()
    for _ in range(3):  # both workers of the domain have served a call with the 60 s timeout
        await asyncio.gather(*(run_once(sandbox, nodes.Echo, {"in": 1}) for _ in range(2)))
    started = loop.time()
    with pytest.raises(DeadlineExceeded, match="node 'n1'"):
        await run_once(sandbox, nodes.Sleeper, {"in": 1}, deadline=loop.time() + 0.5)
    assert loop.time() - started < 30.0
    await assert_serving(sandbox)


async def test_node_timeout_is_a_deadline(sandbox: SandboxRuntime) -> None:
    spec = make_spec(nodes.Sleeper, timeout_s=0.3)
    instance = await sandbox.acquire(spec, ExecutionScope("t"))
    try:
        with pytest.raises(DeadlineExceeded, match="node 'n1'"):
            await instance.process({"in": 1})
    finally:
        await sandbox.release(instance)
    await assert_serving(sandbox)


async def test_node_timeout_does_not_bound_initialize(sandbox: SandboxRuntime) -> None:
    spec = make_spec(nodes.SlowInit, timeout_s=0.1)
    instance = await sandbox.acquire(spec, ExecutionScope("slow-init"))
    try:
        assert await instance.process({"in": "ok"}) == "ok"
    finally:
        await sandbox.release(instance)


# --- escape attempts ------------------------------------------------------------------------


def require_layer(runtime: SandboxRuntime, *names: str) -> None:
    """Skip (with the reason) on a machine where none of the layers that block this escape can
    be applied, e.g. Landlock or seccomp missing from the kernel."""
    active = {layer.name for layer in runtime.layers() if layer.active}
    if not active.intersection(names):
        pytest.skip(f"none of {', '.join(names)} is available here")


async def expect_blocked(runtime: SandboxRuntime, cls: type[nodes.Node],
                         params: dict[str, Any] | None = None) -> WorkerFailure:
    with pytest.raises(WorkerFailure) as err:
        await run_once(runtime, cls, {"in": 1}, params, execution_id="escape")
    assert "blocked by the sandbox" in err.value.cause and err.value.kind == "permission"
    return err.value


async def test_tcp_connect_to_loopback_is_blocked(sandbox: SandboxRuntime) -> None:
    require_layer(sandbox, "seccomp", "landlock network", "network namespace")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        await expect_blocked(sandbox, nodes.TcpConnect, {"port": listener.getsockname()[1]})
        with pytest.raises(BlockingIOError):
            listener.accept()
    await assert_serving(sandbox)


async def test_writing_outside_scratch_is_blocked(sandbox: SandboxRuntime,
                                                  tmp_path: Path) -> None:
    require_layer(sandbox, "landlock")
    target = tmp_path / "escaped.txt"
    await expect_blocked(sandbox, nodes.WriteOutside, {"path": str(target)})
    assert not target.exists()


async def test_granted_device_nodes_open_read_write_and_nothing_else(
        no_leaks: None, tmp_path: Path) -> None:
    """``devices`` (GPU device nodes by default in Settings) are opened read/write inside the
    sandbox; other files outside the scratch dir stay closed. Regular files stand in for device
    nodes here: Landlock treats both alike."""
    granted, other = tmp_path / "fake-gpu0", tmp_path / "not-a-device"
    granted.write_bytes(b"...data")
    other.write_bytes(b"...data")
    # As GPU nodes are (/dev/nvidia* is 0666): a worker of its own uid must be able to use it.
    granted.chmod(0o666)
    runtime = SandboxRuntime(workers=1, scratch_root=str(tmp_path / "scratch"),
                             devices=[str(tmp_path / "fake-gpu*"), "/dev/no-such-device*"])
    await runtime.start()
    try:
        require_layer(runtime, "landlock")
        landlock = next(layer for layer in runtime.layers() if layer.name == "landlock")
        assert f"devices read/write: {granted}" in landlock.detail
        trusted = make_spec(nodes.OpenDevice, {"path": str(granted)}, trusted=True)
        instance = await runtime.acquire(trusted, ExecutionScope("device"))
        try:
            assert await instance.process({"in": 1}) == "opened"
        finally:
            await runtime.release(instance)
        assert granted.read_bytes() == b"GPUdata"
        # Refused by Landlock; or not even there, for a worker of its own uid, in whose mount
        # namespace the directory only root may enter holds just the paths it was granted.
        with pytest.raises((WorkerFailure, NodeFailed)) as err:
            await run_once(runtime, nodes.OpenDevice, {"in": 1}, {"path": str(other)})
        assert (getattr(err.value, "kind", "") == "permission"
                or "FileNotFoundError" in str(err.value))
        assert other.read_bytes() == b"...data"
    finally:
        await runtime.shutdown()


async def test_running_a_shell_is_blocked(sandbox: SandboxRuntime) -> None:
    require_layer(sandbox, "seccomp")
    await expect_blocked(sandbox, nodes.Shell)


async def test_fork_bomb_is_blocked(sandbox: SandboxRuntime) -> None:
    require_layer(sandbox, "seccomp")
    await expect_blocked(sandbox, nodes.ForkBomb)
    await assert_serving(sandbox)


async def test_signalling_the_server_is_blocked(sandbox: SandboxRuntime) -> None:
    require_layer(sandbox, "seccomp")
    # The server, and the worker's actual parent (the launcher).
    await expect_blocked(sandbox, nodes.SignalPid, {"pid": os.getpid()})
    launcher_pid = sandbox.launcher_pid
    assert launcher_pid
    await expect_blocked(sandbox, nodes.SignalPid, {"pid": launcher_pid})
    assert psutil.pid_exists(launcher_pid)


async def test_other_shared_memory_is_out_of_reach(sandbox: SandboxRuntime) -> None:
    require_layer(sandbox, "landlock")
    segment = shared_memory.SharedMemory(create=True, size=4096)
    try:
        await expect_blocked(sandbox, nodes.OpenFile, {"path": f"/dev/shm/{segment.name}"})
    finally:
        segment.close()
        segment.unlink()
    # The server's own segments are memfds: reachable only through its /proc entry.
    await expect_blocked(sandbox, nodes.ReadOtherFds, {"pid": os.getpid()})


# --- lifecycle ------------------------------------------------------------------------------


async def test_layers_are_reported(sandbox: SandboxRuntime) -> None:
    layers = {layer.name: layer for layer in sandbox.layers()}
    assert {"process", "rlimits", "network namespace", "parent death", "landlock",
            "seccomp"} <= set(layers)
    assert layers["process"].active and layers["rlimits"].active


async def test_shutdown_is_idempotent(no_leaks: None) -> None:
    runtime = SandboxRuntime(workers=1)
    await runtime.start()
    assert runtime.healthy()
    out = await run_once(runtime, nodes.WarmCounter, {"in": 1})
    assert out.value["inits"] == 1
    await runtime.shutdown()
    await runtime.shutdown()
    assert not runtime.healthy()


def test_workers_die_with_a_killed_server(no_leaks: None) -> None:
    script = textwrap.dedent("""
        import asyncio, sys
        from tensorline.server.runtime import SandboxRuntime

        async def main():
            runtime = SandboxRuntime(workers=2)
            await runtime.start()
            print(" ".join(map(str, runtime.worker_pids())), flush=True)
            await asyncio.sleep(3600)

        asyncio.run(main())
    """)
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              cwd=REPO, text=True)
    try:
        assert server.stdout is not None
        pids = [int(p) for p in server.stdout.readline().split()]
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    finally:
        server.kill()
        server.wait()

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(lambda: all(gone(p) for p in pids), timeout=5.0, what="workers to die with the server")


# --- under load -----------------------------------------------------------------------------


async def test_mixed_failures_under_concurrency(sandbox: SandboxRuntime) -> None:
    """Crashes, deadlines and node errors interleaved with good calls: each call gets its own
    outcome, and the pool keeps serving."""
    loop = asyncio.get_running_loop()

    async def good(i: int) -> str:
        data = random_array("<f4", 100 + 9000 * (i % 3), seed=i)
        assert same(await run_once(sandbox, nodes.Echo, {"in": data},
                                   execution_id=f"g{i}"), data)
        return "ok"

    async def expect(exc: type[Exception] | tuple[type[Exception], ...], coro: Any) -> str:
        with pytest.raises(exc):
            await coro
        return str(exc)

    calls = []
    for i in range(30):
        kind = i % 6
        if kind == 0:
            calls.append(expect(WorkerFailure, run_once(sandbox, nodes.Segfault, {"in": i})))
        elif kind == 1:
            # Past its deadline in a worker, or still waiting for one when it ran out.
            calls.append(expect((DeadlineExceeded, LimitExceeded), run_once(
                sandbox, nodes.Sleeper, {"in": i}, deadline=loop.time() + 0.3)))
        elif kind == 2:
            calls.append(expect(NodeFailed, run_once(sandbox, nodes.Marker, {"in": i},
                                                     {"mode": "fail"}, execution_id=f"m{i}")))
        else:
            calls.append(good(i))
    results = await asyncio.gather(*calls, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    await assert_serving(sandbox)


async def test_memory_cap_workers_respect_max_workers(no_leaks: None) -> None:
    runtime = SandboxRuntime(workers=1, max_workers=1)
    await runtime.start()
    try:
        with pytest.raises(WorkerFailure, match="memory limit 256 MiB"):
            await run_once(runtime, nodes.MemoryHog, {"in": 1})
        await assert_serving(runtime)
        assert len(runtime.worker_pids()) <= 2
    finally:
        await runtime.shutdown()


# --- trust domains --------------------------------------------------------------------------


async def test_untrusted_modules_get_workers_of_their_own(no_leaks: None) -> None:
    module = nodes.Echo.__module__
    runtime = SandboxRuntime(workers=1, domains=[module])
    await runtime.start()
    try:
        assert len(runtime.worker_pids()) == 2  # the trusted pool and the module's
        trusted_spec = make_spec(nodes.WarmCounter, trusted=True)
        instance = await runtime.acquire(trusted_spec, ExecutionScope("t"))
        try:
            trusted = await instance.process({"in": 1})
        finally:
            await runtime.release(instance)
        spec = make_spec(nodes.WarmCounter, trusted=False)
        instance = await runtime.acquire(spec, ExecutionScope("u"))
        try:
            untrusted = (await instance.process({"in": 1})).value
        finally:
            await runtime.release(instance)
        assert untrusted["pid"] != trusted.value["pid"]
        # A trusted copy of the same class ran elsewhere: the untrusted worker initialized its
        # own instance.
        assert untrusted["inits"] == 1
    finally:
        await runtime.shutdown()


async def test_layers_can_be_disabled_and_are_reported_absent(no_leaks: None) -> None:
    """What a default container profile leaves (no namespaces) is reported, not fatal."""
    runtime = SandboxRuntime(workers=1, namespaces=False, landlock=False, seccomp=False)
    await runtime.start()
    try:
        layers = {layer.name: layer for layer in runtime.layers()}
        for name in ("network namespace", "landlock", "seccomp"):
            assert not layers[name].active and "disabled" in layers[name].detail
        assert layers["rlimits"].active and layers["parent death"].active
        data = np.arange(100_000, dtype=np.int16)
        assert same(await run_once(runtime, nodes.Echo, {"in": data}), data)
        assert runtime.healthy()
    finally:
        await runtime.shutdown()
