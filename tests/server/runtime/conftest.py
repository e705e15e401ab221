"""Fixtures for the runtime tests: node specs without a manifest, a real sandbox runtime, and the
checks every sandbox test ends with (no stray worker process, no new /dev/shm segment)."""

from __future__ import annotations

import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tensorline.server.manifest import NodeSpec
from tensorline.server.nodes import Node, NodeEntry
from tensorline.server.runtime import SandboxRuntime
from tensorline.server.selector import RuntimeDecision
from tests.support.processes import wait_until

TEST_NODES = "tests.server.runtime.sandbox_nodes"


def make_spec(cls: type[Node], params: dict[str, Any] | None = None, *, node_id: str = "n1",
              timeout_s: float | None = None, trusted: bool = False) -> NodeSpec:
    validated = cls.Params(**(params or {}))
    return NodeSpec(
        node_id=node_id,
        entry=NodeEntry.of(cls, cls.__module__, trusted),
        params=validated,
        params_key=validated.model_dump_json(),
        decision=RuntimeDecision("sandbox", "test"),
        timeout_s=timeout_s if timeout_s is not None else cls.traits.timeout_s,
        wiring={},
    )



def _infrastructure_pids() -> set[int]:
    """The forkserver and the resource tracker outlive a runtime by design (one per server)."""
    pids = set()
    fs = getattr(multiprocessing.forkserver, "_forkserver", None)
    if fs is not None and getattr(fs, "_forkserver_pid", None):
        pids.add(fs._forkserver_pid)
    rt = getattr(multiprocessing.resource_tracker, "_resource_tracker", None)
    if rt is not None and getattr(rt, "_pid", None):
        pids.add(rt._pid)
    return pids


def stray_processes() -> list[psutil.Process]:
    keep = _infrastructure_pids()
    stray = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid in keep or child.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.NoSuchProcess:
            continue
        stray.append(child)
    return stray


def shm_segments() -> set[str]:
    """Named shared memory in /dev/shm, less multiprocessing semaphores (``sem.*``): other
    processes on a shared machine create those all the time, and the sandbox never does."""
    try:
        return {name for name in os.listdir("/dev/shm") if not name.startswith("sem.")}
    except FileNotFoundError:
        return set()


def shm_mappings() -> list[str]:
    """/dev/shm files this process has mapped (the sandbox's segments are memfds, never these)."""
    with open("/proc/self/maps") as maps:
        return [line for line in maps if "/dev/shm/" in line]


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Every sandbox test ends with no stray worker and no new /dev/shm segment."""
    before = shm_segments()
    yield
    wait_until(lambda: not stray_processes(), timeout=10.0, what="worker processes to exit")
    assert shm_segments() - before == set()
    assert shm_mappings() == []


@pytest.fixture
async def sandbox(no_leaks: None, tmp_path: Path) -> AsyncIterator[SandboxRuntime]:
    # The test nodes are untrusted (make_spec's default): their module is a trust domain whose
    # workers start with the pool.
    runtime = SandboxRuntime(workers=1, domains=[TEST_NODES], workers_per_domain=2,
                             cpu_seconds=2.0, call_timeout_s=60.0,
                             scratch_root=str(tmp_path / "scratch"), cancel_grace_s=10.0)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.shutdown()
    # Every call ended (answered, or its worker died): none counts as in flight any more (the
    # count decides whether calls overlap, see ``_placement``).
    assert runtime._busy == 0
    assert runtime._placement.bound == {} and runtime._placement.loop_cpu is None
