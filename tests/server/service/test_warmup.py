"""Start-up warm-up (``server/service/_warmup.py``, ``TENSORLINE_WARMUP_NODES``): through a real
``tensorline serve`` process, each declared example runs once before health is SERVING, in the
runtime the selector chooses, and a failing one is logged with its node type while the server
serves; through the engine, which node types a setting selects and that the built-in warm-up
examples run."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from tensorline.client import Client
from tensorline.server import Settings, create_server
from tensorline.server.executor import PipelineEngine
from tensorline.server.nodes import NodeRegistry
from tensorline.server.service import TensorlineServer
from tensorline.server.service._warmup import warm_up, warmups_of
from tests.support.processes import ServerProcess

NODES = "tests.server.preload_nodes"


def count(client: Client, node_type: str) -> dict[str, int]:
    result = client.execute({"version": "v1", "nodes": [{"id": "n", "node_type": node_type}]},
                            {"n": np.ones(1, dtype=np.float32)})
    counted: dict[str, int] = result["n"].value
    return counted


@pytest.fixture(scope="module")
def warmed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Client]]:
    # One worker (and no more), so the sandboxed node's first call lands where it was warmed.
    env = {"TENSORLINE_NODE_MODULES": NODES, "TENSORLINE_LOAD_ENTRY_POINTS": "false",
           "TENSORLINE_SANDBOX_WORKERS": "1", "TENSORLINE_SANDBOX_MAX_WORKERS": "1",
           "TENSORLINE_WARMUP_NODES": "WarmCounted,WarmCountedSandboxed,WarmFails,NoSuchNode"}
    with ServerProcess.start(env=env, pythonpath_repo=True,
                             log_dir=tmp_path_factory.mktemp("warmup-log")) as server, \
            Client(server.target, timeout=60) as client:
        yield server, client


def test_the_warm_up_ran_once_in_the_server_before_serving(
        warmed: tuple[ServerProcess, Client]) -> None:
    server, client = warmed
    # SERVING (ServerProcess waited for it) came after the warm-up: its call was the first.
    assert count(client, "WarmCounted") == {"calls": 2, "pid": server.pid}
    logs = server.logs()
    assert logs.count("warm-up of node type WarmCounted: ") == 1
    assert logs.index("warm-up over; health SERVING") > logs.index(
        "warm-up of node type WarmCounted: ")


def test_the_warm_up_of_a_sandboxed_node_ran_in_its_worker(
        warmed: tuple[ServerProcess, Client]) -> None:
    server, client = warmed
    counted = count(client, "WarmCountedSandboxed")
    assert counted["calls"] == 2 and counted["pid"] != server.pid
    assert "warm-up of node type WarmCountedSandboxed: " in server.logs()
    assert "(sandbox)" in server.logs().split("warm-up of node type WarmCountedSandboxed: ")[1]


def test_a_failing_warm_up_is_logged_with_its_node_type_and_the_server_serves(
        warmed: tuple[ServerProcess, Client]) -> None:
    server, client = warmed
    logs = server.logs()
    assert "warm-up of node type WarmFails failed (the server serves regardless)" in logs
    assert "warm-up boom" in logs
    assert "warm-up: unknown node type 'NoSuchNode'" in logs
    assert server.health() == "SERVING"
    result = client.execute({"version": "v1", "nodes": [{"id": "n", "node_type": "WarmFails"}]},
                            {"n": np.ones(2, dtype=np.float32)})
    assert result["n"].tolist() == [1.0, 1.0]


def test_the_setting_selects_declared_warm_ups_only() -> None:
    registry = NodeRegistry.default(modules=[NODES], entry_points=True)
    engine = PipelineEngine.local(registry)
    everything = {node_type for node_type, _ in warmups_of(engine, ["*"])}
    assert {"AudioResample", "ButterLowpass", "WarmCounted", "WarmFails"} <= everything
    assert "Scale" not in everything  # declares no warm-up
    assert [t for t, _ in warmups_of(engine, ["WarmFails", "Scale", "*", "WarmFails"])
            ].count("WarmFails") == 1
    assert warmups_of(engine, []) == []


async def test_the_built_in_warm_up_examples_run(caplog: pytest.LogCaptureFixture) -> None:
    """AudioResample's and ButterLowpass's declared examples are valid calls."""
    engine = PipelineEngine.local()
    await engine.start()
    try:
        with caplog.at_level(logging.INFO, logger="tensorline.server.service._warmup"):
            assert await warm_up(engine, ["AudioResample", "ButterLowpass"]) == []
        assert "warm-up of node type AudioResample: " in caplog.text
        assert "warm-up of node type ButterLowpass: " in caplog.text
    finally:
        await engine.shutdown()


async def health_status(server: TensorlineServer) -> int:
    status: int = (await server.health.Check(health_pb2.HealthCheckRequest(), None)).status
    return status


async def test_health_is_not_serving_until_the_warm_up_is_over() -> None:
    server, _ = await create_server(Settings(
        host="127.0.0.1", port=0, sandbox=False, load_entry_points=False,
        node_modules=[NODES], warmup_nodes=["WarmCounted"]))
    await server.start()
    try:
        # Either still warming (NOT_SERVING) or done: never SERVING while warming.
        status = await health_status(server)
        assert server.warming == (status == health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.warmed()
        assert not server.warming
        assert await health_status(server) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(grace=0)


async def test_a_warm_up_past_its_timeout_is_abandoned_and_the_server_serves(
        caplog: pytest.LogCaptureFixture) -> None:
    server, _ = await create_server(Settings(
        host="127.0.0.1", port=0, sandbox=False, load_entry_points=False,
        node_modules=[NODES], warmup_nodes=["WarmHangs", "WarmCounted"], warmup_timeout_s=0.2))
    with caplog.at_level(logging.INFO, logger="tensorline.server.service"):
        await server.start()
        try:
            assert server.warming
            assert await health_status(server) == health_pb2.HealthCheckResponse.NOT_SERVING
            await server.warmed()
            assert await health_status(server) == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop(grace=0)
    assert "warm-up not finished within 0.2 s (warmup_timeout_s): abandoned" in caplog.text
