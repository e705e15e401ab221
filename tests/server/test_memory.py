"""The server's allocator tuning (``_memory``): large messages reuse heap buffers rather than
page-faulting on fresh ones every call. Shown on real ``tensorline serve`` processes by their
minor page faults per 1 MiB call, with the tuning (the default) and without it (0)."""

from __future__ import annotations

import numpy as np
import pytest

from tensorline.client import Client
from tensorline.server._memory import MAX_HEAP_BUFFER_BYTES, glibc, keep_heap_buffers
from tests.support.manifests import one_node
from tests.support.processes import ServerProcess

pytestmark = pytest.mark.skipif(glibc() is None, reason="the tuning is glibc's mallopt")

CALLS = 20


def minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        # Fields after the command (which may hold spaces): minflt is the 8th.
        return int(stat.read().rpartition(")")[2].split()[7])


def faults_per_call(env: dict[str, str]) -> float:
    manifest = one_node("PassThrough", node_id="p", runtime_hint="inprocess")
    tensor = np.arange(256 * 1024, dtype=np.float32)  # 1 MiB
    with ServerProcess.start(env=env) as server, Client(server.target, timeout=60) as client:
        for _ in range(5):  # the first calls size the heap
            client.execute(manifest, {"p": tensor})
        before = minor_faults(server.pid)
        for _ in range(CALLS):
            result = client.execute(manifest, {"p": tensor})
        after = minor_faults(server.pid)
    assert np.array_equal(result.outputs["p"], tensor)
    return (after - before) / CALLS


def test_large_calls_reuse_heap_buffers_instead_of_faulting_on_new_pages() -> None:
    tuned = faults_per_call({})
    untuned = faults_per_call({"TENSORLINE_HEAP_BUFFER_BYTES": "0"})
    # A 1 MiB buffer on fresh pages is 256 faults; each call passes through several.
    assert tuned < 128, f"{tuned:.0f} minor faults per 1 MiB call with the tuning"
    assert untuned > 256, f"only {untuned:.0f} minor faults per call without it"


def test_keep_heap_buffers_is_idempotent_and_bounded() -> None:
    assert keep_heap_buffers(0) is False
    assert keep_heap_buffers(MAX_HEAP_BUFFER_BYTES * 4) is True  # clipped to glibc's maximum
    assert keep_heap_buffers(MAX_HEAP_BUFFER_BYTES) is True
