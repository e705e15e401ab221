"""The Open Inference Protocol through Triton's own client (tritonclient, sync and asyncio)
against a real server serving a directory of named pipelines: readiness, metadata, inference on
a multi-node pipeline that runs in the sandbox and in-process (FP32, INT64 and BYTES compared
bit for bit with numpy), typed contents, errors with Triton's status codes, streaming."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tensorline.server import TensorlineServer
from tests.conftest import TEST_NODE_MODULES

MIXED = """\
version: v1
metadata: {name: mixed}
nodes:
  - {id: scale, node_type: Scale, params: {factor: 1.5}, runtime_hint: sandbox}
  - {id: quarter, node_type: Scale, params: {factor: 0.25}, runtime_hint: inprocess}
  - {id: triple, node_type: Scale, params: {factor: 3}, runtime_hint: inprocess}
  - {id: upper, node_type: UpperBytes}
connections:
  - {from: scale, to: quarter}
"""
DESCRIBE = """\
version: v1
metadata: {name: describe}
nodes:
  - {id: d, node_type: Describe}
"""
# A decoupled model: a streaming node that answers every second request, and flushes at the end.
WINDOWS = """\
version: v1
metadata: {name: windows}
nodes:
  - {id: pairs, node_type: Accumulator, params: {count: 2}}
  - {id: tenfold, node_type: Scale, params: {factor: 10}}
connections:
  - {from: pairs, to: tenfold}
"""
# A decoupled model whose second node fails on the value 1.
FRAGILE = """\
version: v1
metadata: {name: fragile}
nodes:
  - {id: each, node_type: Accumulator, params: {count: 1}}
  - {id: check, node_type: FailAt, params: {sequence: 1}}
connections:
  - {from: each, to: check}
"""
# Two numeric inputs: what the plain-request fast path takes, in any order, or refuses.
PAIR = """\
version: v1
metadata: {name: pair}
nodes:
  - {id: left, node_type: Scale, params: {factor: 2}}
  - {id: right, node_type: Scale, params: {factor: 3}}
"""
BROKEN = "version: v1\nnodes:\n  - {id: s, node_type: NoSuchNode}\n"


@pytest.fixture
async def oip_server(server_factory: Callable[..., Any], tmp_path: Path) -> TensorlineServer:
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "mixed.yaml").write_text(MIXED)
    (pipelines / "describe.yaml").write_text(DESCRIBE)
    (pipelines / "broken.yaml").write_text(BROKEN)
    (pipelines / "pair.yaml").write_text(PAIR)
    (pipelines / "windows.yaml").write_text(WINDOWS)
    (pipelines / "fragile.yaml").write_text(FRAGILE)
    server: TensorlineServer = await server_factory(
        pipelines_dir=pipelines, node_modules=[*TEST_NODE_MODULES, "tests.nodes.oip"])
    return server


@pytest.fixture
async def aio_client(oip_server: TensorlineServer) -> AsyncIterator[triton_aio.InferenceServerClient]:
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{oip_server.port}")
    try:
        yield client
    finally:
        await client.close()


def mixed_inputs(module: Any) -> tuple[list[Any], dict[str, np.ndarray[Any, Any]]]:
    """The mixed pipeline's inputs for ``module`` (tritonclient.grpc or .aio) and the outputs
    numpy computes from them, the same operations in the same dtypes."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    ids = rng.integers(-2**40, 2**40, size=(4,), dtype=np.int64)
    words = np.array([b"tensor\x00line\xff\x01 triton"], dtype=object)
    inputs = [module.InferInput("scale", [2, 3], "FP32"),
              module.InferInput("triple", [4], "INT64"),
              module.InferInput("upper", [1], "BYTES")]
    for tensor, value in zip(inputs, (x, ids, words), strict=True):
        tensor.set_data_from_numpy(value)
    expected = {"quarter": (x * np.float32(1.5)) * np.float32(0.25),
                "triple": ids * np.int64(3),
                "upper": np.array([words[0].upper()], dtype=object)}
    return inputs, expected


def assert_bit_exact(result: Any, expected: dict[str, np.ndarray[Any, Any]]) -> None:
    for name, want in expected.items():
        got = result.as_numpy(name)
        assert got.shape == want.shape, name
        if want.dtype == object:
            assert got.tolist() == want.tolist(), name
        else:
            assert got.dtype == want.dtype, name
            assert got.tobytes() == want.tobytes(), name


async def test_readiness_and_metadata_through_the_asyncio_client(
        aio_client: triton_aio.InferenceServerClient) -> None:
    assert await aio_client.is_server_live()
    assert await aio_client.is_server_ready()
    assert await aio_client.is_model_ready("mixed")
    assert await aio_client.is_model_ready("mixed", "1")
    assert not await aio_client.is_model_ready("mixed", "2")
    assert not await aio_client.is_model_ready("broken")
    assert not await aio_client.is_model_ready("nothing-here")

    server = await aio_client.get_server_metadata()
    assert server.name == "tensorline"
    assert "model_repository" in server.extensions

    metadata = await aio_client.get_model_metadata("mixed")
    assert metadata.name == "mixed"
    assert list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("scale", "", [-1]), ("triple", "", [-1]), ("upper", "BYTES", [1])]
    assert [t.name for t in metadata.outputs] == ["quarter", "triple", "upper"]
    described = await aio_client.get_model_metadata("describe")
    assert [(t.name, t.datatype, list(t.shape)) for t in described.inputs] == [
        ("d.blob", "BYTES", [1]), ("d.doc", "BYTES", [1])]

    index = await aio_client.get_model_repository_index()
    states = {(m.name, m.version, m.state) for m in index.models}
    assert {("mixed", "1", "READY"), ("describe", "1", "READY")} <= states
    broken = next(m for m in index.models if m.name == "broken")
    assert broken.state == "UNAVAILABLE"
    assert "NoSuchNode" in broken.reason


async def test_mixed_runtime_pipeline_bit_exact_through_the_asyncio_client(
        aio_client: triton_aio.InferenceServerClient, oip_server: TensorlineServer) -> None:
    inputs, expected = mixed_inputs(triton_aio)
    result = await aio_client.infer("mixed", inputs, request_id="req-1")
    assert_bit_exact(result, expected)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("mixed", "1", "req-1")
    assert [o.datatype for o in response.outputs] == ["FP32", "INT64", "BYTES"]
    # Only what was asked for comes back.
    only = await aio_client.infer("mixed", inputs,
                                  outputs=[triton_aio.InferRequestedOutput("triple")])
    assert [o.name for o in only.get_response().outputs] == ["triple"]
    # The sandbox ran its node: the pool has a worker.
    assert oip_server.engine.runtimes["sandbox"].stats()["workers"] >= 1


async def test_mixed_runtime_pipeline_bit_exact_through_the_sync_client(
        oip_server: TensorlineServer) -> None:
    def call() -> tuple[Any, dict[str, Any], bool, bool]:
        client = triton.InferenceServerClient(f"127.0.0.1:{oip_server.port}")
        try:
            inputs, expected = mixed_inputs(triton)
            return (client.infer("mixed", inputs), expected, client.is_server_ready(),
                    client.is_model_ready("mixed"))
        finally:
            client.close()

    result, expected, server_ready, model_ready = await asyncio.to_thread(call)
    assert server_ready and model_ready
    assert_bit_exact(result, expected)


async def test_typed_contents_are_accepted_and_mixing_is_refused(
        oip_server: TensorlineServer) -> None:
    request = service_pb2.ModelInferRequest(model_name="mixed", id="typed")
    x = np.array([[1.25, -2.5, 3.0], [0.1, 0.2, 0.3]], dtype=np.float32)
    for name, datatype, shape, field, values in (
            ("scale", "FP32", [2, 3], "fp32_contents", x.reshape(-1).tolist()),
            ("triple", "INT64", [2], "int64_contents", [2**62 // 3, -7]),
            ("upper", "BYTES", [1], "bytes_contents", [b"abc"])):
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        getattr(tensor.contents, field).extend(values)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{oip_server.port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = await stub.ModelInfer(request)
        assert response.id == "typed"
        outputs = dict(zip((o.name for o in response.outputs), response.raw_output_contents,
                           strict=True))
        assert outputs["quarter"] == ((x * np.float32(1.5)) * np.float32(0.25)).tobytes()
        assert outputs["triple"] == np.array([2**62 // 3 * 3, -21], dtype=np.int64).tobytes()
        assert outputs["upper"] == len(b"ABC").to_bytes(4, "little") + b"ABC"

        request.raw_input_contents.append(x.tobytes())
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw contents for 3 input(s)" in (raised.value.details() or "")


async def test_errors_have_tritons_status_codes_and_name_the_model_and_input(
        aio_client: triton_aio.InferenceServerClient) -> None:
    inputs, _ = mixed_inputs(triton_aio)

    with pytest.raises(InferenceServerException) as raised:
        await aio_client.infer("nothing-here", inputs)
    assert raised.value.status() == "StatusCode.NOT_FOUND"
    assert "nothing-here" in raised.value.message()

    with pytest.raises(InferenceServerException) as raised:
        await aio_client.infer("broken", inputs)
    assert raised.value.status() == "StatusCode.UNAVAILABLE"
    assert "'broken' is not ready" in raised.value.message()
    assert "NoSuchNode" in raised.value.message()

    wrong = triton_aio.InferInput("scales", [2, 3], "FP32")
    wrong.set_data_from_numpy(np.zeros((2, 3), np.float32))
    with pytest.raises(InferenceServerException) as raised:
        await aio_client.infer("mixed", [wrong, *inputs[1:]])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    message = raised.value.message()
    assert "model 'mixed' has no input 'scales'" in message
    assert "missing required input(s) scale" in message

    with pytest.raises(InferenceServerException) as raised:
        await aio_client.infer("mixed", inputs, outputs=[
            triton_aio.InferRequestedOutput("triple", class_count=3)])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "output 'triple': classification is not supported" in raised.value.message()

    shared = triton_aio.InferInput("scale", [2, 3], "FP32")
    shared.set_shared_memory("region", 24)
    with pytest.raises(InferenceServerException) as raised:
        await aio_client.infer("mixed", [shared, *inputs[1:]])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'scale': shared memory is not supported" in raised.value.message()

    with pytest.raises(InferenceServerException) as raised:
        await aio_client.infer("mixed", inputs, outputs=[triton_aio.InferRequestedOutput("x")])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "model 'mixed' has no output 'x'" in raised.value.message()


async def test_bad_raw_contents_are_invalid_arguments(oip_server: TensorlineServer) -> None:
    """What tritonclient would not send, through Triton's generated stub."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{oip_server.port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def refusal(datatype: str, shape: list[int], raw: bytes) -> str:
            request = service_pb2.ModelInferRequest(model_name="mixed")
            request.inputs.add(name="scale", datatype=datatype, shape=shape)
            request.inputs.add(name="triple", datatype="INT64", shape=[1])
            request.inputs.add(name="upper", datatype="BYTES", shape=[1])
            request.raw_input_contents.extend([raw, b"\x00" * 8, b"\x01\x00\x00\x00a"])
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ModelInfer(request)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            return raised.value.details() or ""

        assert "model 'mixed' input 'scale': unknown datatype 'FP8'" in await refusal(
            "FP8", [2], b"\x00\x00")
        assert "model 'mixed' input 'scale': raw contents hold 20 bytes; shape [2, 3] of FP32 " \
               "needs 24" in await refusal("FP32", [2, 3], b"\x00" * 20)
        assert "model 'mixed' input 'scale': a tensor input takes a numeric datatype, not " \
               "BYTES" in await refusal("BYTES", [1], b"\x01\x00\x00\x00a")
        assert "element 0 declares 9 bytes but only 1 remain" in await refusal(
            "BYTES", [1], b"\x09\x00\x00\x00a")


async def test_plain_inputs_in_any_order_and_one_given_twice(
        oip_server: TensorlineServer) -> None:
    """Raw numeric tensors, one per input of the model: the fast path's case. Given in either
    order they reach their ports; one given twice (as many tensors as inputs, one missing) is
    refused naming both problems, as the full decoding reports them."""
    left, right = np.arange(4, dtype=np.float32), np.arange(3, dtype=np.float64)

    def request(*tensors: tuple[str, np.ndarray[Any, Any]]) -> Any:
        message = service_pb2.ModelInferRequest(model_name="pair", id="p")
        for name, value in tensors:
            message.inputs.add(name=name, datatype="FP32" if value.dtype == np.float32
                               else "FP64", shape=list(value.shape))
            message.raw_input_contents.append(value.tobytes())
        return message

    async with grpc.aio.insecure_channel(f"127.0.0.1:{oip_server.port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for order in ((("left", left), ("right", right)), (("right", right), ("left", left))):
            response = await stub.ModelInfer(request(*order))
            outputs = dict(zip((o.name for o in response.outputs),
                               response.raw_output_contents, strict=True))
            assert outputs == {"left": (left * 2).tobytes(), "right": (right * 3).tobytes()}
            assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
                ("left", "FP32", [4]), ("right", "FP64", [3])]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(request(("left", left), ("left", left)))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = raised.value.details() or ""
    assert "model 'pair' input 'left' is given twice" in details
    assert "missing required input(s) right" in details


async def test_shapes_and_versions_numpy_or_int_refuse_are_invalid_arguments(
        oip_server: TensorlineServer) -> None:
    """Zero elements in a shape numpy cannot make (more dimensions than it supports, a
    dimension past its size limit), raw or typed, and a version of non-ASCII digits: the
    client's error (INVALID_ARGUMENT naming the field), never INTERNAL."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{oip_server.port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def refusal(shape: list[int], raw: bool, version: str = "") -> str:
            request = service_pb2.ModelInferRequest(model_name="pair", model_version=version)
            left = request.inputs.add(name="left", datatype="FP32", shape=shape)
            right = request.inputs.add(name="right", datatype="FP32", shape=[1])
            if raw:
                request.raw_input_contents.extend([b"", b"\x00" * 4])
            else:
                left.contents.fp32_contents.extend([])
                right.contents.fp32_contents.extend([0.0])
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ModelInfer(request)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value
            return raised.value.details() or ""

        for raw in (True, False):
            for shape in ([0, 2**62], [0] * 70, [2**31, 2**31, 0]):
                details = await refusal(shape, raw)
                assert "inputs[0].shape" in details and "unsupported shape" in details, details
        assert "a model version is a positive integer, got '²'" in await refusal(
            [1], True, version="²")


async def test_single_element_kinds_and_an_output_without_a_datatype(
        aio_client: triton_aio.InferenceServerClient) -> None:
    blob = triton_aio.InferInput("d.blob", [1], "BYTES")
    blob.set_data_from_numpy(np.array([b"\x00\x01\x02"], dtype=object))
    doc = triton_aio.InferInput("d.doc", [1], "BYTES")
    doc.set_data_from_numpy(np.array([b'{"b": 1, "a": [2]}'], dtype=object))
    # The complex spectrum has no v2 datatype: asking for it fails, naming it.
    with pytest.raises(InferenceServerException) as raised:
        await aio_client.infer("describe", [blob, doc])
    assert raised.value.status() == "StatusCode.FAILED_PRECONDITION"
    assert "output 'd.spectrum' has dtype complex128" in raised.value.message()
    result = await aio_client.infer("describe", [blob, doc],
                                    outputs=[triton_aio.InferRequestedOutput("d.summary")])
    assert result.as_numpy("d.summary").tolist() == [b"3 bytes, keys ['a', 'b']"]

    not_json = triton_aio.InferInput("d.doc", [1], "BYTES")
    not_json.set_data_from_numpy(np.array([b"{nope"], dtype=object))
    with pytest.raises(InferenceServerException) as raised:
        await aio_client.infer("describe", [blob, not_json])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "model 'describe' input 'd.doc': invalid JSON" in raised.value.message()


async def test_stream_infer_answers_every_request_in_order_with_errors_inline(
        oip_server: TensorlineServer) -> None:
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def run() -> list[tuple[Any, Any]]:
        client = triton.InferenceServerClient(f"127.0.0.1:{oip_server.port}")
        try:
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            inputs, _ = mixed_inputs(triton)
            client.async_stream_infer("mixed", inputs, request_id="s-1")
            client.async_stream_infer("nothing-here", inputs, request_id="s-2")
            client.async_stream_infer("mixed", inputs, request_id="s-3")
            received = [results.get(timeout=60) for _ in range(3)]
            client.stop_stream()
            return received
        finally:
            client.close()

    received = await asyncio.to_thread(run)
    _, expected = mixed_inputs(triton)
    (first, first_error), (_, second_error), (third, third_error) = received
    assert first_error is None and third_error is None
    assert first.get_response().id == "s-1"
    assert third.get_response().id == "s-3"
    assert_bit_exact(first, expected)
    assert second_error is not None
    assert "[NOT_FOUND]" in second_error.message()
    assert "nothing-here" in second_error.message()


def test_tensorline_serve_pipelines_through_tritonclient(tmp_path: Path) -> None:
    """The README's path: ``tensorline serve --pipelines DIR`` in a process of its own, called
    with tritonclient."""
    from tests.support.processes import ServerProcess

    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "scale.yaml").write_text(
        "version: v1\nmetadata: {name: doubler}\n"
        "nodes:\n  - {id: x, node_type: Scale, params: {factor: 2}}\n")
    with ServerProcess.start(args=["--pipelines", str(pipelines)]) as server:
        client = triton.InferenceServerClient(server.target)
        try:
            assert client.is_model_ready("doubler")
            x = triton.InferInput("x", [3], "FP32")
            x.set_data_from_numpy(np.array([1.0, 2.5, -3.0], dtype=np.float32))
            result = client.infer("doubler", [x])
        finally:
            client.close()
    assert result.as_numpy("x").tolist() == [2.0, 5.0, -6.0]


async def test_stream_infer_on_a_decoupled_model_answers_as_results_come(
        oip_server: TensorlineServer) -> None:
    """A streaming pipeline's requests feed one session: a response per result, carrying the id
    of the request it came from; the end-of-stream flush follows stop_stream. A bad request
    gets its error and the session goes on; a plain model's request in the same stream gets its
    one response."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def window(value: float) -> list[Any]:
        tensor = triton.InferInput("pairs", [1], "FP64")
        tensor.set_data_from_numpy(np.array([value], dtype=np.float64))
        return [tensor]

    def run() -> list[tuple[Any, Any]]:
        client = triton.InferenceServerClient(f"127.0.0.1:{oip_server.port}")
        try:
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            for index in range(2):
                client.async_stream_infer("windows", window(float(index)),
                                          request_id=f"w-{index}")
            first = [results.get(timeout=60)]
            wrong = triton.InferInput("nope", [1], "FP64")
            wrong.set_data_from_numpy(np.zeros(1))
            client.async_stream_infer("windows", [wrong], request_id="bad")
            first.append(results.get(timeout=60))
            for index in range(2, 5):
                client.async_stream_infer("windows", window(float(index)),
                                          request_id=f"w-{index}")
            inputs, _ = mixed_inputs(triton)
            client.async_stream_infer("mixed", inputs, request_id="plain")
            client.stop_stream()
            return first + [results.get_nowait() for _ in range(results.qsize())]
        finally:
            client.close()

    received = await asyncio.to_thread(run)
    errors = [(error.message()) for _, error in received if error is not None]
    assert len(errors) == 1
    assert "[INVALID_ARGUMENT]" in errors[0]
    assert "model 'windows' has no input 'nope'" in errors[0]
    answers = [(r.get_response().id, r.as_numpy(r.get_response().outputs[0].name).tolist())
               for r, error in received if error is None]
    assert answers[0] == ("w-1", [0.0, 10.0])
    assert ("w-3", [20.0, 30.0]) in answers
    assert [name for name, _ in answers if name == "plain"] == ["plain"]
    # The flush: the last window, with the last request's id, after the client ended.
    assert answers[-1] == ("w-4", [40.0])


async def test_a_failed_decoupled_session_reports_and_the_next_request_opens_a_new_one(
        oip_server: TensorlineServer) -> None:
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def send(client: Any, value: float, request_id: str) -> tuple[Any, Any]:
        tensor = triton.InferInput("each", [1], "FP64")
        tensor.set_data_from_numpy(np.array([value], dtype=np.float64))
        client.async_stream_infer("fragile", [tensor], request_id=request_id)
        return results.get(timeout=60)

    def run() -> list[tuple[Any, Any]]:
        client = triton.InferenceServerClient(f"127.0.0.1:{oip_server.port}")
        try:
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            received = [send(client, 0.0, "f-0"), send(client, 1.0, "f-1"),
                        send(client, 2.0, "f-2")]
            client.stop_stream()
            return received
        finally:
            client.close()

    (first, first_error), (_, failure), (third, third_error) = await asyncio.to_thread(run)
    assert first_error is None and third_error is None
    assert (first.get_response().id, first.as_numpy("check").tolist()) == ("f-0", [0.0])
    assert failure is not None
    assert "[UNKNOWN]" in failure.message()
    assert "node 'check'" in failure.message() and "cannot handle 1" in failure.message()
    assert (third.get_response().id, third.as_numpy("check").tolist()) == ("f-2", [2.0])


async def test_bytes_that_do_not_parse_are_invalid_arguments(
        oip_server: TensorlineServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{oip_server.port}") as channel:
        for method in ("ModelInfer", "ServerLive", "RepositoryModelLoad"):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await channel.unary_unary(f"/inference.GRPCInferenceService/{method}")(
                    b"\xff\xff\xff")
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert f"not a valid inference.{method}Request" in (raised.value.details() or "")
        # On a stream: the error in error_message, and the stream goes on.
        call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                     response_deserializer=service_pb2.ModelStreamInferResponse
                                     .FromString)()
        good = service_pb2.ModelInferRequest(model_name="nothing-here", id="after")
        await call.write(b"\xff\xff\xff")
        await call.write(good.SerializeToString())
        await call.done_writing()
        responses = [response async for response in call]
    assert "[INVALID_ARGUMENT]" in responses[0].error_message
    assert "not a valid inference.ModelInferRequest" in responses[0].error_message
    assert responses[1].infer_response.id == "after"
    assert "[NOT_FOUND]" in responses[1].error_message
