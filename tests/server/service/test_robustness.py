"""Bad input, refusals and shutdown through a real server: every case ends with the status the
server means (never INTERNAL, never a metadata-size error), and nothing waits longer than it
has to."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorline.client import (
    AsyncClient,
    InvalidRequestError,
    LimitExceededError,
    TensorlineError,
    TransportError,
)
from tensorline.wire import Limits, PortItem, decode_stream_request
from tests.support.fuzz import SERVICE
from tests.support.polling import eventually
from tests.support.processes import ServerProcess

SCALE = {"nodes": [{"id": "s", "node_type": "Scale", "params": {"factor": 2}}]}


def chain(count: int, *, cycle: bool = False) -> dict[str, Any]:
    ids = [f"n{i}" for i in range(count)]
    connections = [{"from": a, "to": b} for a, b in itertools.pairwise(ids)]
    if cycle:
        connections.append({"from": ids[-1], "to": ids[0]})
    return {"nodes": [{"id": i, "node_type": "PassThrough"} for i in ids],
            "connections": connections}


async def invalid(client: AsyncClient, manifest: Any, inputs: Any = None) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        await client.execute(manifest, inputs)
    return info.value


async def test_sixty_nodes_without_inputs_fit_the_clients_metadata_limit(
        client: AsyncClient) -> None:
    manifest = {"nodes": [{"id": f"node-{i}-" + "x" * 100, "node_type": "Scale"}
                          for i in range(200)]}
    error = await invalid(client, manifest)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert 1 < len(error.violations) < 200
    assert "more problem(s) not shown" in error.violations[-1].description
    shown = int(error.violations[-1].description.split()[0])
    assert shown + len(error.violations) - 1 == 200


async def test_a_thousand_duplicate_inputs_keep_the_rarer_problem_in_view(
        client: AsyncClient) -> None:
    inputs = [PortItem("s", "", np.ones(2)) for _ in range(1000)]
    error = await invalid(client, SCALE, [*inputs, PortItem("ghost", "", np.ones(2))])
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert any("ghost" in v.description for v in error.violations[:-1])
    assert "more problem(s) not shown" in error.violations[-1].description


@pytest.mark.parametrize("text", [
    '{"nodes": ' + "[" * 5000 + "]" * 5000 + "}",
    '{"nodes": [{"id": "s", "node_type": "Scale", "params": {"factor": ' + "9" * 5000 + "}}]}",
    '{"nodes": [{"id": "s", "node_type": "Scale", "params": {"factor": NaN}}]}',
])
async def test_hostile_manifest_json_is_refused_with_a_violation(client: AsyncClient,
                                                                 text: str) -> None:
    with pytest.raises(TensorlineError) as info:
        await client.execute(text, {"s": np.ones(1)})
    assert info.value.code in (grpc.StatusCode.INVALID_ARGUMENT,
                               grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert info.value.violations[0].field == "manifest_json"


async def test_long_chains_and_cycles_compile_without_recursion(client: AsyncClient) -> None:
    error = await invalid(client, chain(3000, cycle=True))
    assert error.violations[0].description.startswith("cycle: n")
    result = await client.execute(chain(1500), {"n0": np.arange(3.0)})
    np.testing.assert_array_equal(result["n1499"], np.arange(3.0))


async def test_json_values_beyond_the_depth_limit_are_violations(client: AsyncClient) -> None:
    from tensorline.client import Json

    deep: Any = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(LimitExceededError) as info:
        await client.execute({"nodes": [{"id": "p", "node_type": "PassThrough"}]},
                             {"p": Json(deep)})
    assert "nested" in info.value.violations[0].description


@pytest.mark.parametrize("raw", [
    b"\x0a\x06\x0a\x04\xff\xfe\xc3\x28",  # StreamInit whose manifest is not UTF-8
    b"\x22\x06\x0a\x04\xff\xfe\xc3\x28",  # StreamCancel whose reason is not UTF-8
    b"\x12\x08\x22\x06\x22\x04[[[[",  # a chunk of JSON that does not parse
])
def test_every_stream_decode_error_is_a_violation(raw: bytes) -> None:
    decoded = decode_stream_request(raw, Limits(max_json_depth=64))
    assert decoded.violations, decoded


async def test_undecodable_stream_init_is_invalid_argument(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(SERVICE + "StreamPipeline", request_serializer=None,
                                     response_deserializer=None)()
        await call.write(b"\x0a\x06\x0a\x04\xff\xfe\xc3\x28")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_request_text_is_clipped_in_the_log(
        client: AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    name = "n" * 1_000_000
    with caplog.at_level(logging.INFO):
        await client.execute({"metadata": {"name": name}, **SCALE}, {"s": np.ones(1)})
        with pytest.raises(InvalidRequestError):
            await client.execute({"metadata": {"name": name}, "nodes": [
                {"id": "s", "node_type": "x" * 1_000_000}]})
    assert caplog.records
    assert max(len(r.getMessage()) for r in caplog.records) < 4000


async def test_an_open_health_watch_does_not_hold_shutdown(
        server_factory: Callable[..., Any]) -> None:
    server = await server_factory(grace_s=20.0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 10.0  # not the 20 s grace
        statuses = []
        while (response := await watch.read()) is not grpc.aio.EOF:
            statuses.append(response.status)
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses


async def test_a_stream_opened_during_the_drain_gets_unavailable(
        server_factory: Callable[..., Any]) -> None:
    server = await server_factory(grace_s=20.0)
    async with AsyncClient(f"127.0.0.1:{server.port}", retry_unavailable=False) as client:
        held = client.stream(SCALE)
        await held.open()
        stopping = asyncio.ensure_future(server.stop())
        await eventually(lambda: server.service.admission.draining)
        for _ in range(20):
            with pytest.raises(TransportError) as info:
                async with client.stream(SCALE):
                    pass
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
        await held.close()
        await stopping


async def _open_many(target: str, count: int, **config: Any) -> Counter[str]:
    async with AsyncClient(target, retry_unavailable=False, **config) as client:
        async def one() -> str:
            try:
                async with client.stream(SCALE, timeout=30):
                    return "OK"
            except TensorlineError as error:
                return f"{type(error).__name__}:{error.code.name if error.code else ''}"

        return Counter(await asyncio.gather(*(one() for _ in range(count))))


@pytest.mark.parametrize("refusal", ["shed", "auth"])
async def test_stream_refusals_before_ready_reach_the_client_as_sent(refusal: str) -> None:
    """Against a separate server process (the race needs two processes): hundreds of streams
    refused at open all get the refusal's own status, none INTERNAL."""
    env = {"TENSORLINE_SANDBOX": "false", "TENSORLINE_LOAD_ENTRY_POINTS": "false",
           "TENSORLINE_MAX_CONCURRENT_STREAMS": "1", "TENSORLINE_AUTH_TOKENS": "secret"}
    with ServerProcess.start(env=env, pythonpath_repo=True) as server:
        if refusal == "auth":
            outcomes = await _open_many(server.target, 400)
            assert outcomes == {"AuthenticationError:UNAUTHENTICATED": 400}
            return
        async with AsyncClient(server.target, token="secret") as client:
            held = client.stream(SCALE)
            await held.open()
            outcomes = await _open_many(server.target, 400, token="secret")
            await held.close()
        assert outcomes == {"LimitExceededError:RESOURCE_EXHAUSTED": 400}
