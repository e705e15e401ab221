"""Shared fixtures: a real tensorline server on an ephemeral port and real clients."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from tensorline.client import AsyncClient
from tensorline.server import Settings, TensorlineServer, create_server
from tensorline.server.nodes import NodeRegistry

# Test node modules live in tests/nodes; importable by workers too (the repo root is on sys.path).
TEST_NODE_MODULES = ("tests.nodes.basic", "tests.nodes.spine", "tests.nodes.streaming")


def settings_for_tests(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "grace_s": 2.0,
                              "load_entry_points": False, "sandbox_workers": 1}
    values.update(overrides)
    return Settings(**values)


def pytest_asyncio_loop_factories(config: pytest.Config,
                                  item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """The loop async tests run on: asyncio's by default; ``TENSORLINE_TEST_EVENT_LOOP=uvloop``
    runs them on uvloop, the loop ``tensorline serve`` picks (``.ci/test`` runs the server
    suites both ways)."""
    if os.environ.get("TENSORLINE_TEST_EVENT_LOOP", "asyncio") == "uvloop":
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture
def make_settings() -> Callable[..., Settings]:
    return settings_for_tests


@pytest.fixture
async def server_factory() -> AsyncIterator[Callable[..., Any]]:
    """Start real servers (stopped at the end of the test): ``await server_factory(**settings)``."""
    started: list[TensorlineServer] = []

    async def start(registry: NodeRegistry | None = None, **overrides: Any) -> TensorlineServer:
        overrides.setdefault("node_modules", list(TEST_NODE_MODULES))
        server, _ = await create_server(settings_for_tests(**overrides), registry=registry)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop(grace=0.5)


@pytest.fixture
async def server(server_factory: Callable[..., Any]) -> TensorlineServer:
    srv: TensorlineServer = await server_factory()
    return srv


@pytest.fixture
async def client(server: TensorlineServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{server.port}") as c:
        yield c


@pytest.fixture
def target(server: TensorlineServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(autouse=True, scope="session")
def _repo_root_on_path() -> Iterator[None]:
    """Worker processes import test nodes as ``tests.nodes``; make the repo root importable."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = root + (os.pathsep + old if old else "")
    yield
    os.environ["PYTHONPATH"] = old
