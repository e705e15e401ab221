"""Worker recycling: a worn worker is replaced without failing a call (after ``max_calls``,
past the peak-RSS threshold, on an idle probe), and counted in ``stats()``. The fd-exhaustion
case runs through a real server in tests/server/test_sandbox_escape.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorline.server.runtime import ExecutionScope, SandboxRuntime
from tests.server.runtime import sandbox_nodes as nodes
from tests.server.runtime.conftest import TEST_NODES, make_spec
from tests.support.polling import eventually

Factory = Callable[..., Any]


@pytest.fixture
async def runtime_with(no_leaks: None, tmp_path: Path) -> AsyncIterator[Factory]:
    started: list[SandboxRuntime] = []

    async def make(**options: Any) -> SandboxRuntime:
        runtime = SandboxRuntime(workers=1, domains=[TEST_NODES], workers_per_domain=1,
                                 scratch_root=str(tmp_path / "scratch"), **options)
        started.append(runtime)
        await runtime.start()
        return runtime

    yield make
    for runtime in started:
        await runtime.shutdown()


async def echo_pids(runtime: SandboxRuntime, calls: int) -> list[int]:
    """Run ``calls`` one-shot calls one after another; the pid of the worker that served each."""
    spec = make_spec(nodes.OneShot, {"tag": "t"})
    pids = []
    for index in range(calls):
        out = await runtime.call(spec, ExecutionScope(f"e{index}"), {"in": np.arange(3.0)})
        pids.append(int(out.value["pid"]))
    return pids


async def test_a_worker_is_replaced_after_max_calls(runtime_with: Factory) -> None:
    runtime = await runtime_with(max_calls=3)
    pids = await echo_pids(runtime, 9)
    # Every call succeeded; no worker served more than three of them.
    assert all(pids.count(pid) <= 3 for pid in pids) and len(set(pids)) >= 3
    assert runtime.stats()["worker_recycles"] >= 2


async def test_a_worker_past_the_rss_threshold_is_replaced(runtime_with: Factory) -> None:
    # 1 MiB: any worker is past it after its first reply.
    runtime = await runtime_with(recycle_rss_mb=1)
    pids = await echo_pids(runtime, 4)
    assert len(set(pids)) == 4
    assert runtime.stats()["worker_recycles"] >= 3


async def test_idle_workers_are_probed(runtime_with: Factory) -> None:
    runtime = await runtime_with(probe_interval_s=0.05)
    workers = list(runtime._workers.values())
    await eventually(lambda: all(w.calls >= 2 for w in workers), 10.0, "idle workers probed")
    assert all(w.alive for w in workers) and runtime.stats()["worker_recycles"] == 0
