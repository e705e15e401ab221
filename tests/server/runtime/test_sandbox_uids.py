"""Worker uids are unique on the host: two servers' pools (here two runtimes in one process,
each numbering its workers from 1) never give their workers the same uid, so neither shares
signals, files or a thread budget with the other's; a dead worker's uid is free again."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from tensorline.server.runtime import SandboxRuntime

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="workers get uids of their own only "
                                                           "when the server is root")


def worker_uids(runtime: SandboxRuntime) -> set[int]:
    return {psutil.Process(w.pid).uids().real for w in runtime._workers.values()
            if w.alive and w.pid is not None}


async def test_two_pools_on_one_host_never_share_a_worker_uid(no_leaks: None,
                                                                tmp_path: Path) -> None:
    first = SandboxRuntime(workers=2, scratch_root=str(tmp_path / "a"))
    second = SandboxRuntime(workers=2, scratch_root=str(tmp_path / "b"))
    await first.start()
    try:
        await second.start()
        try:
            ours, theirs = worker_uids(first), worker_uids(second)
            assert len(ours) == 2 and len(theirs) == 2
            assert not ours & theirs
            assert os.geteuid() not in ours | theirs
        finally:
            await second.shutdown()
        # The second pool's uids were released with its workers: a third pool may take them.
        third = SandboxRuntime(workers=2, scratch_root=str(tmp_path / "c"))
        await third.start()
        try:
            assert worker_uids(third) == theirs
        finally:
            await third.shutdown()
    finally:
        await first.shutdown()
