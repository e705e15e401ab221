"""The Open Inference Protocol gets what PipelineService gets on the same port: bearer-token
auth, TLS, load shedding, drain (ServerReady false, in-flight calls finish, new ones refused),
metrics and reflection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from tensorline.server import TensorlineServer
from tests.nodes import spine
from tests.server.service.test_observability import scrape
from tests.server.service.test_service import reflected_services
from tests.support.certs import make_certs
from tests.support.polling import eventually

SCALE = "version: v1\nnodes:\n  - {id: s, node_type: Scale, params: {factor: 2}}\n"
# Holds its call until the test sets the "release" event (same event loop: in-process server).
GATE = """\
version: v1
nodes:
  - {id: g, node_type: Rendezvous, params: {name: entered, wait_for: release}}
"""


def pipelines_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pipelines"
    directory.mkdir()
    (directory / "scale.yaml").write_text(SCALE)
    (directory / "gate.yaml").write_text(GATE)
    return directory


def scale_input(value: np.ndarray[Any, Any]) -> list[triton_aio.InferInput]:
    tensor = triton_aio.InferInput("s", list(value.shape), "FP64")
    tensor.set_data_from_numpy(value)
    return [tensor]


async def test_bearer_token_required(server_factory: Callable[..., Any], tmp_path: Path) -> None:
    server = await server_factory(pipelines_dir=pipelines_dir(tmp_path), auth_tokens=["s3cret"])
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        with pytest.raises(InferenceServerException) as raised:
            await client.infer("scale", scale_input(np.ones(2)))
        assert raised.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as raised:
            await client.get_model_metadata("scale", headers={"authorization": "Bearer nope"})
        assert raised.value.status() == "StatusCode.UNAUTHENTICATED"
        result = await client.infer("scale", scale_input(np.arange(3.0)),
                                    headers={"authorization": "Bearer s3cret"})
        np.testing.assert_array_equal(result.as_numpy("s"), [0.0, 2.0, 4.0])
    finally:
        await client.close()


async def test_tls(server_factory: Callable[..., Any], tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    server = await server_factory(pipelines_dir=pipelines_dir(tmp_path),
                                  tls_cert_file=certs.server_cert, tls_key_file=certs.server_key)
    client = triton_aio.InferenceServerClient(f"localhost:{server.port}", ssl=True,
                                              root_certificates=str(certs.ca))
    try:
        assert await client.is_model_ready("scale")
        result = await client.infer("scale", scale_input(np.arange(2.0)))
        np.testing.assert_array_equal(result.as_numpy("s"), [0.0, 2.0])
    finally:
        await client.close()


async def test_load_shedding_and_drain(server_factory: Callable[..., Any],
                                       tmp_path: Path) -> None:
    spine.reset()
    server: TensorlineServer = await server_factory(pipelines_dir=pipelines_dir(tmp_path),
                                                    max_concurrent_executions=1, grace_s=30.0)
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{server.port}")
    gate = triton_aio.InferInput("g", [3], "INT32")
    gate.set_data_from_numpy(np.arange(3, dtype=np.int32))
    try:
        in_flight = asyncio.ensure_future(client.infer("gate", [gate]))
        await eventually(lambda: spine.rendezvous_event("entered").is_set(), what="gate entered")
        # The one execution slot is taken: shed, with the limit named.
        with pytest.raises(InferenceServerException) as raised:
            await client.infer("scale", scale_input(np.ones(1)))
        assert raised.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "limit 1" in raised.value.message()

        stopping = asyncio.ensure_future(server.stop())
        await eventually(lambda: server.service.admission.draining, what="drain")
        assert not await client.is_server_ready()
        assert not await client.is_model_ready("scale")
        assert await client.is_server_live()
        with pytest.raises(InferenceServerException) as raised:
            await client.infer("scale", scale_input(np.ones(1)))
        assert raised.value.status() == "StatusCode.UNAVAILABLE"
        assert "draining" in raised.value.message()

        spine.rendezvous_event("release").set()
        result = await in_flight
        np.testing.assert_array_equal(result.as_numpy("g"), np.arange(3, dtype=np.int32))
        await stopping
    finally:
        spine.rendezvous_event("release").set()
        await client.close()


async def test_metrics_count_inference_calls(server_factory: Callable[..., Any],
                                             tmp_path: Path) -> None:
    server = await server_factory(pipelines_dir=pipelines_dir(tmp_path), metrics_port=0,
                                  metrics_host="127.0.0.1")
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        for _ in range(3):
            await client.infer("scale", scale_input(np.ones(2)))
        with pytest.raises(InferenceServerException):
            await client.infer("no-such-model", scale_input(np.ones(2)))
        await client.is_model_ready("scale")
    finally:
        await client.close()
    samples = await asyncio.to_thread(scrape, server.metrics_port)
    assert samples[("tensorline_requests_total", (("code", "OK"), ("method", "ModelInfer")))] == 3
    assert samples[("tensorline_requests_total",
                    (("code", "NOT_FOUND"), ("method", "ModelInfer")))] == 1
    assert samples[("tensorline_requests_total", (("code", "OK"), ("method", "ModelReady")))] == 1
    assert samples[("tensorline_node_executions_total",
                    (("node_type", "Scale"), ("runtime", "inprocess")))] == 3
    assert samples[("tensorline_inflight_executions", ())] == 0


async def test_reflection_lists_the_inference_service(server_factory: Callable[..., Any],
                                                      tmp_path: Path) -> None:
    server = await server_factory(pipelines_dir=pipelines_dir(tmp_path), reflection=True)
    assert {"inference.GRPCInferenceService", "tensorline.v1.PipelineService"} <= \
        await reflected_services(f"127.0.0.1:{server.port}")
