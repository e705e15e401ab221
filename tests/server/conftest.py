"""Fixtures for tests that drive the sandbox through a real server: a server with an untrusted
test-node module, and a module-wide check that no worker process or /dev/shm segment is left."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tensorline.client import AsyncClient
from tensorline.server import TensorlineServer
from tests.server.runtime.conftest import shm_segments, stray_processes
from tests.support.processes import wait_until

UNTRUSTED = "tests.server.runtime.sandbox_nodes"


@pytest.fixture(scope="module")
def leak_check() -> Iterator[None]:
    before = shm_segments()
    yield
    wait_until(lambda: not stray_processes(), timeout=10.0, what="worker processes to exit")
    assert shm_segments() - before == set()


@pytest.fixture
async def sandboxed(server_factory: Callable[..., Any], leak_check: None,
                    tmp_path: Path) -> AsyncIterator[tuple[TensorlineServer, AsyncClient]]:
    server = await server_factory(untrusted_modules=[UNTRUSTED], sandbox_workers=2,
                                  sandbox_cpu_seconds=2.0, sandbox_scratch_dir=tmp_path)
    async with AsyncClient(f"127.0.0.1:{server.port}", retry_unavailable=False) as client:
        yield server, client
