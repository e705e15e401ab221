"""Repository changes seen through the Open Inference Protocol: a manifest edited on disk while
tritonclient calls (sync and asyncio) keep coming is picked up with no failed call, and
RepositoryModelLoad / RepositoryModelUnload do what Triton's do."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from tensorline.server import TensorlineServer
from tests.support.polling import eventually

X = np.array([1.5, -2.25, 3.0], dtype=np.float32)


def manifest(factor: int) -> str:
    return ("version: v1\nmetadata: {name: live}\n"
            f"nodes:\n  - {{id: x, node_type: Scale, params: {{factor: {factor}}}}}\n")


def replace_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` in one step (the watcher never sees half a file)."""
    staging = path.with_suffix(".staging")
    staging.write_text(text)
    os.replace(staging, path)


def request(module: Any) -> list[Any]:
    tensor = module.InferInput("x", [3], "FP32")
    tensor.set_data_from_numpy(X)
    return [tensor]


def check(result: Any) -> str:
    """The version that answered, after checking its output is that version's, bit for bit."""
    version = result.get_response().model_version
    factor = {"1": 2, "2": 3}[version]
    assert result.as_numpy("x").tobytes() == (X * np.float32(factor)).tobytes()
    return str(version)


@pytest.fixture
async def live_server(server_factory: Callable[..., Any],
                      tmp_path: Path) -> tuple[TensorlineServer, Path]:
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "live.yaml").write_text(manifest(2))
    server: TensorlineServer = await server_factory(pipelines_dir=pipelines)
    return server, pipelines / "live.yaml"


async def test_a_manifest_changed_under_load_is_picked_up_with_no_failed_call(
        live_server: tuple[TensorlineServer, Path]) -> None:
    server, path = live_server
    target = f"127.0.0.1:{server.port}"
    answered: dict[str, int] = {"1": 0, "2": 0}
    failures: list[BaseException] = []
    stop = threading.Event()
    # Set once ModelMetadata lists version 2: every call started after it must get version 2.
    switched = threading.Event()
    late_answers: list[str] = []

    def record(version: str, started_after_switch: bool) -> None:
        answered[version] += 1
        if started_after_switch:
            late_answers.append(version)

    async def aio_caller() -> None:
        client = triton_aio.InferenceServerClient(target)
        try:
            while not stop.is_set():
                after = switched.is_set()
                try:
                    record(check(await client.infer("live", request(triton_aio))), after)
                except BaseException as error:  # every failure counts, assertion ones included
                    failures.append(error)
                    return
        finally:
            await client.close()

    def sync_caller() -> None:
        client = triton.InferenceServerClient(target)
        try:
            while not stop.is_set():
                after = switched.is_set()
                try:
                    record(check(client.infer("live", request(triton))), after)
                except BaseException as error:
                    failures.append(error)
                    return
        finally:
            client.close()

    callers = [asyncio.ensure_future(aio_caller()) for _ in range(4)]
    callers += [asyncio.ensure_future(asyncio.to_thread(sync_caller)) for _ in range(2)]
    observer = triton_aio.InferenceServerClient(target)
    try:
        await eventually(lambda: answered["1"] >= 50 or bool(failures), 60.0,
                         "calls on version 1")
        replace_file(path, manifest(3))

        async def new_version_listed() -> bool:
            metadata = await observer.get_model_metadata("live")
            return list(metadata.versions) == ["2"]

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60.0
        while not await new_version_listed():
            assert not failures, failures
            assert loop.time() < deadline, "version 2 not listed within 60 s"
            await asyncio.sleep(0.05)
        switched.set()
        assert await observer.is_model_ready("live", "2")
        assert not await observer.is_model_ready("live", "1")
        await eventually(lambda: len(late_answers) >= 50 or bool(failures), 60.0,
                         "calls on version 2")
    finally:
        stop.set()
        await asyncio.gather(*callers, return_exceptions=True)
        await observer.close()
    assert failures == []
    assert answered["1"] >= 50 and answered["2"] >= 50
    assert set(late_answers) == {"2"}


async def test_load_and_unload_through_tritonclient(
        live_server: tuple[TensorlineServer, Path]) -> None:
    server, path = live_server
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        await client.unload_model("live")
        assert not await client.is_model_ready("live")
        with pytest.raises(InferenceServerException) as raised:
            await client.infer("live", request(triton_aio))
        assert raised.value.status() == "StatusCode.UNAVAILABLE"
        assert "'live' is not ready" in raised.value.message()
        index = {m.name: m for m in (await client.get_model_repository_index()).models}
        assert index["live"].state == "UNAVAILABLE"

        # Loading re-reads the file: the edit made meanwhile is the new version.
        path.write_text(manifest(3))
        await client.load_model("live")
        assert await client.is_model_ready("live")
        result = await client.infer("live", request(triton_aio))
        assert result.as_numpy("x").tobytes() == (X * np.float32(3)).tobytes()

        with pytest.raises(InferenceServerException) as raised:
            await client.load_model("nothing-here")
        assert raised.value.status() == "StatusCode.NOT_FOUND"
        assert "nothing-here" in raised.value.message()

        # A file that fails validation: INVALID_ARGUMENT, and the version before keeps serving.
        path.write_text("version: v1\nmetadata: {name: live}\nnodes:\n"
                        "  - {id: x, node_type: NoSuchNode}\n")
        with pytest.raises(InferenceServerException) as raised:
            await client.load_model("live")
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "NoSuchNode" in raised.value.message()
        result = await client.infer("live", request(triton_aio))
        assert result.as_numpy("x").tobytes() == (X * np.float32(3)).tobytes()

        with pytest.raises(InferenceServerException) as raised:
            await client.load_model("live", config='{"backend": "python"}')
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "parameters are not supported (got config)" in raised.value.message()
        with pytest.raises(InferenceServerException) as raised:
            await client.unload_model("nothing-here")
        assert raised.value.status() == "StatusCode.NOT_FOUND"
    finally:
        await client.close()


DECLARED = """\
version: v1
metadata:
  name: declared
  inputs: [{name: image, node: src, datatype: FP32, shape: [-1, 3]}]
  outputs:
    - {name: scaled, node: s, datatype: FP32, shape: [-1, 3]}
    - {name: doubled, node: d, datatype: FP64}
nodes:
  - {id: src, node_type: PassThrough}
  - {id: s, node_type: Scale, params: {factor: 0.5}}
  - {id: d, node_type: Scale, params: {factor: 2}}
connections:
  - {from: src, to: s}
  - {from: src, to: d}
"""


async def test_declared_names_datatypes_and_shapes(server_factory: Callable[..., Any],
                                                   tmp_path: Path) -> None:
    """``metadata.inputs`` / ``outputs`` name the model's tensors and declare their datatype
    and shape: ModelMetadata reports them, inputs are checked against them, and an output that
    is not what its declaration says is FAILED_PRECONDITION naming it."""
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "declared.yaml").write_text(DECLARED)
    server = await server_factory(pipelines_dir=pipelines)
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        metadata = await client.get_model_metadata("declared")
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
            ("image", "FP32", [-1, 3])]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
            ("scaled", "FP32", [-1, 3]), ("doubled", "FP64", [-1])]

        image = np.arange(6, dtype=np.float32).reshape(2, 3)
        tensor = triton_aio.InferInput("image", [2, 3], "FP32")
        tensor.set_data_from_numpy(image)
        result = await client.infer("declared", [tensor],
                                    outputs=[triton_aio.InferRequestedOutput("scaled")])
        assert result.as_numpy("scaled").tobytes() == (image * np.float32(0.5)).tobytes()
        # Scale keeps FP32: the declared FP64 output is not what the pipeline produces.
        with pytest.raises(InferenceServerException) as raised:
            await client.infer("declared", [tensor])
        assert raised.value.status() == "StatusCode.FAILED_PRECONDITION"
        assert ("output 'doubled' is FP32 of shape [2, 3]; the manifest declares FP64"
                in raised.value.message())

        wide = triton_aio.InferInput("image", [2, 3], "FP64")
        wide.set_data_from_numpy(image.astype(np.float64))
        with pytest.raises(InferenceServerException) as raised:
            await client.infer("declared", [wide])
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "model 'declared' input 'image': expects FP32, got FP64" in raised.value.message()
        flat = triton_aio.InferInput("image", [6], "FP32")
        flat.set_data_from_numpy(image.reshape(-1))
        with pytest.raises(InferenceServerException) as raised:
            await client.infer("declared", [flat])
        assert "expects shape [-1, 3] (-1: any size), got [6]" in raised.value.message()
    finally:
        await client.close()
