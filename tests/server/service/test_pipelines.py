"""Named pipelines through a real server (``pipelines_dir``): start-up load with a broken
manifest reported while the others serve, ExecutePipeline and StreamPipeline by name and
version, the request errors, and changes on disk picked up while calls continue."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tensorline.client import AsyncClient, Client, NotFoundError, ServerError, TensorlineError
from tensorline.server import PIPELINE_HEALTH_PREFIX, TensorlineServer
from tensorline.v1 import SERVICE_NAME
from tensorline.v1 import tensorline_pb2 as pb
from tensorline.wire import encode_execute_request, encode_stream_init
from tests.nodes import spine
from tests.support.polling import eventually


def scale(factor: float, name: str = "scaler") -> str:
    return (f"metadata: {{name: {name}}}\n"
            f"nodes:\n  - {{id: s, node_type: Scale, params: {{factor: {factor}}}}}\n")


def gate(name: str, gate_name: str) -> str:
    """A pipeline whose call waits (in node g) until the test opens the gate."""
    return (f"metadata: {{name: {name}}}\nnodes:\n"
            f"  - {{id: g, node_type: WarmGate, params: {{name: {gate_name}}}}}\n")


async def start(server_factory: Callable[..., Any], directory: Path,
                **settings: Any) -> tuple[TensorlineServer, AsyncClient]:
    server = await server_factory(pipelines_dir=directory, **settings)
    return server, AsyncClient(f"127.0.0.1:{server.port}")


async def pipelines(client: AsyncClient) -> dict[str, pb.PipelineInfo]:
    return {info.status.name: info for info in await client.list_pipelines()}


async def test_startup_reports_a_broken_manifest_while_the_others_serve(
        server_factory: Callable[..., Any], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "scale.yaml").write_text(scale(2))
    (tmp_path / "declared.yaml").write_text(
        "metadata:\n  inputs: [{name: audio, node: s, datatype: FP32, shape: [-1]}]\n"
        "nodes:\n  - {id: s, node_type: Scale}\n")
    (tmp_path / "broken.yaml").write_text("nodes:\n  - {id: s, node_type: NoSuchNode}\n")
    caplog.set_level(logging.ERROR, "tensorline.server.repository")
    server, client = await start(server_factory, tmp_path)
    async with client:
        listed = await pipelines(client)
        assert sorted(listed) == ["broken", "declared", "scaler"]
        assert (listed["scaler"].status.state, list(listed["scaler"].status.versions)) == (
            "READY", [1])
        assert [(p.name, p.node_id, p.port, p.kind, p.required) for p in
                listed["scaler"].inputs] == [("s", "s", "in", "tensor", True)]
        assert [(p.name, p.port) for p in listed["scaler"].outputs] == [("s", "out")]
        assert [(p.name, p.datatype, list(p.shape)) for p in listed["declared"].inputs] == [
            ("audio", "FP32", [-1])]
        assert listed["broken"].status.state == "UNAVAILABLE"
        assert "NoSuchNode" in listed["broken"].status.reason
        assert listed["broken"].status.source.endswith("broken.yaml")
        info = await client.server_info()
        assert {p.name: p.state for p in info.pipelines} == {
            "broken": "UNAVAILABLE", "declared": "READY", "scaler": "READY"}
        # Per-pipeline health; the server's own is unchanged by a broken manifest.
        assert f"{SERVICE_NAME}/pipeline/" == PIPELINE_HEALTH_PREFIX
        assert await client.health() == "SERVING"
        assert await client.health(PIPELINE_HEALTH_PREFIX + "scaler") == "SERVING"
        assert await client.health(PIPELINE_HEALTH_PREFIX + "broken") == "NOT_SERVING"
        assert any("broken" in r.getMessage() and "NoSuchNode" in r.getMessage()
                   for r in caplog.records)
        result = await client.execute(pipeline="scaler", inputs={"s": np.arange(3.0)})
        np.testing.assert_array_equal(result["s"], [0.0, 2.0, 4.0])
        assert result.metrics.plan_cached
        result = await client.execute(pipeline="scaler", version=1, inputs={"s": np.ones(1)})
        np.testing.assert_array_equal(result["s"], [2.0])
        with pytest.raises(NotFoundError, match=r"'broken'.*NoSuchNode"):
            await client.execute(pipeline="broken", inputs={"s": np.ones(1)})
        with pytest.raises(NotFoundError, match="'nothing'"):
            await client.execute(pipeline="nothing", inputs={"s": np.ones(1)})
        with pytest.raises(NotFoundError, match="no version 9"):
            await client.execute(pipeline="scaler", version=9, inputs={"s": np.ones(1)})
    assert server.repository is not None


async def test_streams_by_name_and_version(server_factory: Callable[..., Any],
                                           tmp_path: Path) -> None:
    (tmp_path / "scale.yaml").write_text(scale(3))
    server, client = await start(server_factory, tmp_path)
    async with client:
        for version in (None, 1):
            async with client.stream(pipeline="scaler", version=version) as stream:
                await stream.send("s", np.ones(2))
                await stream.send("s", np.full(2, 2.0))
                await stream.close()
                outputs = [output async for output in stream]
            assert [list(o.value) for o in outputs] == [[3.0, 3.0], [6.0, 6.0]]
        with pytest.raises(NotFoundError, match="no version 4"):
            async with client.stream(pipeline="scaler", version=4):
                pass


    def blocking() -> tuple[list[float], list[pb.PipelineInfo]]:
        with Client(f"127.0.0.1:{server.port}") as blocking_client:
            with blocking_client.stream(pipeline="scaler", version=1) as stream:
                stream.send("s", np.ones(1))
                stream.close()
                values = [float(o.value[0]) for o in stream]
            return values, blocking_client.list_pipelines()

    values, listed = await asyncio.to_thread(blocking)
    assert values == [3.0]
    assert [info.status.name for info in listed] == ["scaler"]


async def test_both_or_neither_is_invalid_and_names_the_field(
        server_factory: Callable[..., Any], tmp_path: Path) -> None:
    (tmp_path / "scale.yaml").write_text(scale(2))
    server, client = await start(server_factory, tmp_path)
    manifest = '{"nodes": [{"id": "s", "node_type": "Scale"}]}'
    async with client, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        execute = channel.unary_unary(f"/{SERVICE_NAME}/ExecutePipeline")
        for request, field in (
                (encode_execute_request(manifest, [], "scaler"), "pipeline"),
                (encode_execute_request("", []), "manifest_json"),
                (encode_execute_request(manifest, [], "", 2), "pipeline_version"),
                (encode_execute_request("", [], "scaler", -1), "pipeline_version")):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await execute(request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"{field}:" in (caught.value.details() or "")
        stream = channel.stream_stream(f"/{SERVICE_NAME}/StreamPipeline")
        call = stream()
        await call.write(encode_stream_init(manifest, 0, "scaler"))
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "init.pipeline:" in (caught.value.details() or "")
        # The client refuses both at once before sending.
        with pytest.raises(TensorlineError, match="not both or neither"):
            await client.execute({"nodes": []}, pipeline="scaler")


async def test_a_server_without_a_repository_says_so(client: AsyncClient) -> None:
    with pytest.raises(ServerError, match=r"no pipeline repository.*--pipelines") as caught:
        await client.execute(pipeline="scaler", inputs={"s": np.ones(1)})
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(ServerError, match="--pipelines"):
        await client.list_pipelines()
    assert list((await client.server_info()).pipelines) == []


async def test_a_change_on_disk_is_picked_up_while_calls_continue(
        server_factory: Callable[..., Any], tmp_path: Path) -> None:
    path = tmp_path / "scale.yaml"
    path.write_text(scale(2))
    _, client = await start(server_factory, tmp_path)
    seen: set[float] = set()
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def call_continuously() -> None:
        while not stop.is_set():
            try:
                result = await client.execute(pipeline="scaler", inputs={"s": np.ones(1)})
                seen.add(float(result["s"][0]))
            except Exception as exc:
                failures.append(exc)

    async def version_2_ready() -> bool:
        info = (await pipelines(client))["scaler"].status
        return info.state == "READY" and list(info.versions) == [2]

    async with client:
        callers = [asyncio.ensure_future(call_continuously()) for _ in range(3)]
        try:
            await eventually(lambda: 2.0 in seen, what="calls on version 1")
            path.write_text(scale(3))
            ready = False
            loop = asyncio.get_running_loop()
            end = loop.time() + 30
            while not ready:
                assert loop.time() < end, "version 2 never became ready"
                ready = await version_2_ready()
            await eventually(lambda: 3.0 in seen, what="calls on version 2")
        finally:
            stop.set()
            await asyncio.gather(*callers)
        assert failures == []
        assert seen == {2.0, 3.0}
        assert await client.health(PIPELINE_HEALTH_PREFIX + "scaler") == "SERVING"


async def wait_listed(client: AsyncClient, condition: Callable[[dict[str, pb.PipelineInfo]], bool],
                      what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + 30
    while not condition(await pipelines(client)):
        assert loop.time() < end, f"timed out waiting for {what}"


async def test_a_removed_pipeline_drains(server_factory: Callable[..., Any],
                                         tmp_path: Path) -> None:
    name = f"drain-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "gated.yaml"
    path.write_text(gate("gated", name))
    _, client = await start(server_factory, tmp_path)
    async with client:
        call = asyncio.ensure_future(client.execute(pipeline="gated", inputs={"g": np.ones(2)}))
        await eventually(spine.rendezvous_event(f"{name}:in").is_set, what="the call in flight")
        path.unlink()
        await wait_listed(client, lambda listed: "gated" not in listed, "the removal")
        with pytest.raises(NotFoundError, match="'gated'"):
            await client.execute(pipeline="gated", inputs={"g": np.ones(2)})
        assert await client.health(PIPELINE_HEALTH_PREFIX + "gated") == "NOT_SERVING"
        assert not call.done()
        spine.rendezvous_event(f"{name}:go").set()
        result = await call
        np.testing.assert_array_equal(result["g"], [1.0, 1.0])


async def test_a_call_in_flight_finishes_on_its_version_after_a_change(
        server_factory: Callable[..., Any], tmp_path: Path) -> None:
    name = f"change-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "gated.yaml"
    path.write_text(gate("gated", name))
    _, client = await start(server_factory, tmp_path)
    async with client:
        call = asyncio.ensure_future(client.execute(pipeline="gated", inputs={"g": np.ones(2)}))
        await eventually(spine.rendezvous_event(f"{name}:in").is_set, what="the call in flight")
        # Version 2 scales by 3 under the same node id.
        path.write_text("metadata: {name: gated}\n"
                        "nodes:\n  - {id: g, node_type: Scale, params: {factor: 3}}\n")
        await wait_listed(client, lambda listed: list(listed["gated"].status.versions) == [2],
                          "version 2")
        result = await client.execute(pipeline="gated", inputs={"g": np.ones(2)})
        np.testing.assert_array_equal(result["g"], [3.0, 3.0])
        with pytest.raises(NotFoundError, match="version 1 was replaced by version 2"):
            await client.execute(pipeline="gated", version=1, inputs={"g": np.ones(2)})
        spine.rendezvous_event(f"{name}:go").set()
        np.testing.assert_array_equal((await call)["g"], [1.0, 1.0])


async def test_sandboxed_nodes_are_created_in_a_worker_before_the_pipeline_is_ready(
        server_factory: Callable[..., Any], tmp_path: Path, leak_check: None) -> None:
    untrusted = "tests.server.runtime.sandbox_nodes"
    directory = tmp_path / "pipelines"
    directory.mkdir()
    (directory / "counter.yaml").write_text(
        "nodes:\n  - {id: c, node_type: WarmCounter, params: {label: repo}}\n")
    # Its initialize raises in the worker: the warm-up finds out, no call does.
    (directory / "initfails.yaml").write_text("nodes:\n  - {id: f, node_type: FailingInit}\n")
    _, client = await start(server_factory, directory, untrusted_modules=[untrusted],
                            sandbox_scratch_dir=tmp_path / "scratch", pipelines_watch=False)
    async with client:
        listed = await pipelines(client)
        assert listed["counter"].status.state == "READY"
        assert listed["initfails"].status.state == "UNAVAILABLE"
        assert "cannot initialize" in listed["initfails"].status.reason
        result = await client.execute(pipeline="counter", inputs={"c": np.ones(1)})
        assert result.metrics.nodes[0].runtime == "sandbox"
        # The instance the warm-up created serves the first call.
        counts = result["c"].value
        assert (counts["inits"], counts["calls"]) == (1, 1)


def watchers() -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks()
            if "DirectoryWatcher" in getattr(task.get_coro(), "__qualname__", "")]


async def test_the_watcher_stops_with_the_server_and_can_be_turned_off(
        server_factory: Callable[..., Any], tmp_path: Path) -> None:
    (tmp_path / "scale.yaml").write_text(scale(2))
    server = await server_factory(pipelines_dir=tmp_path)
    assert len(watchers()) == 1
    await server.stop(grace=0.5)
    await server.stop(grace=0.5)  # idempotent
    assert watchers() == []
    unwatched = await server_factory(pipelines_dir=tmp_path, pipelines_watch=False)
    assert watchers() == []
    async with AsyncClient(f"127.0.0.1:{unwatched.port}") as client:
        assert list((await pipelines(client))["scaler"].status.versions) == [1]
