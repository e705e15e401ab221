"""Node errors, server bugs, deadlines, node timeouts and client cancellation, end to end."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from tensorline.client import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    NodeError,
    ServerError,
    TensorlineError,
)
from tensorline.server import TensorlineServer
from tests.nodes.basic import EVENTS, EVENTS_LOCK


def events(node_id: str) -> list[str]:
    with EVENTS_LOCK:
        return list(EVENTS.get(node_id, []))


async def wait_for_event(node_id: str, event: str, timeout: float = 10.0) -> None:
    """Poll the node's recorded lifecycle until ``event`` shows up (never a fixed sleep)."""
    async with asyncio.timeout(timeout):
        # Nodes record from worker threads too, so there is no loop Event to wait on: poll.
        while event not in events(node_id):  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def one_node(node_id: str, node_type: str, **extra: Any) -> dict[str, Any]:
    return {"version": "v1", "nodes": [{"id": node_id, "node_type": node_type, **extra}]}


async def test_node_exception_maps_to_node_error(client: AsyncClient) -> None:
    manifest = one_node("explode", "Fail", params={"message": "the reactor is on fire"})
    with pytest.raises(NodeError) as caught:
        await client.execute(manifest, {"explode": np.zeros(1)})
    error = caught.value
    assert error.code == grpc.StatusCode.UNKNOWN
    assert error.reason == "NODE_ERROR"
    assert error.node_id == "explode"
    assert error.exception_type == "ValueError"
    assert "explode" in error.message
    assert "ValueError" in error.message
    assert "the reactor is on fire" in error.message


@pytest.mark.parametrize(("node_type", "exception_type", "text"), [
    ("KeyFail", "KeyError", "missing-thing"),
    ("FailInit", "RuntimeError", "cannot load the model"),
    ("WrongOutput", "TypeError", "cannot send a value of type set"),
])
async def test_other_node_failures_are_node_errors_not_internal(
        client: AsyncClient, node_type: str, exception_type: str, text: str) -> None:
    with pytest.raises(NodeError) as caught:
        await client.execute(one_node("n", node_type), {"n": np.zeros(1)})
    assert caught.value.code == grpc.StatusCode.UNKNOWN
    assert caught.value.node_id == "n"
    assert caught.value.exception_type == exception_type
    assert text in caught.value.message


@pytest.mark.parametrize(("what", "text"), [
    ("strings", "cannot travel on the wire"),
    ("float128", "cannot travel on the wire"),
    ("audio_rate", "sample_rate must be positive"),
    ("audio_shape", "(frames,) or (frames, channels)"),
    ("json_nan", "Out of range float values"),
    ("json_object", "not JSON serializable"),
    ("surrogate", "surrogates not allowed"),
    ("metadata", "metadata keys and values must be strings"),
    ("metadata_none", "metadata must be a dict of strings, got NoneType"),
    ("metadata_pairs", "metadata must be a dict of strings, got list"),
    ("nested_tagged", "cannot hold another Tagged value"),
])
@pytest.mark.parametrize("runtime", ["inprocess", "sandbox"])
async def test_unencodable_output_is_the_nodes_error(client: AsyncClient, what: str,
                                                     text: str, runtime: str) -> None:
    with pytest.raises(NodeError) as caught:
        await client.execute(one_node("bad", "BadOutput", params={"what": what},
                                      runtime_hint=runtime), {"bad": np.zeros(1)})
    assert caught.value.code == grpc.StatusCode.UNKNOWN
    assert caught.value.node_id == "bad"
    if runtime == "sandbox" and what in SANDBOX_SAYS:
        # Refused by the worker as it sends the output (the same rule as the server's).
        assert SANDBOX_SAYS[what] in caught.value.message
    else:
        assert "output 'out' cannot be sent" in caught.value.message
        assert text in caught.value.message


# What a worker says of outputs it cannot send (the server's check never sees them): a JSON
# value crosses as its text, written by the worker, and a tag map is checked as it is sent.
SANDBOX_SAYS = {
    "json_nan": "ValueError: Out of range float values",
    "json_object": "TypeError: Object of type object is not JSON serializable",
    "metadata": "TypeError: metadata keys and values must be strings",
    "metadata_none": "TypeError: metadata must be a dict of strings, got NoneType",
    "metadata_pairs": "TypeError: metadata must be a dict of strings, got list",
    "nested_tagged": "TypeError: a Tagged value cannot hold another Tagged value",
}


async def test_failure_cancels_and_cleans_up_the_other_branch(client: AsyncClient) -> None:
    slow = unique("slow")
    manifest = {"version": "v1", "nodes": [
        {"id": "bad", "node_type": "Fail"},
        {"id": slow, "node_type": "SlowAsync", "params": {"seconds": 60}},
    ]}
    task = asyncio.ensure_future(client.execute(manifest, {"bad": np.zeros(1),
                                                           slow: np.zeros(1)}))
    with pytest.raises(NodeError) as caught:
        await task
    assert caught.value.node_id == "bad"
    await wait_for_event(slow, "cleanup")
    assert events(slow) == ["initialize", "process", "cleanup"]


async def test_server_bug_is_internal(server: TensorlineServer, client: AsyncClient,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise AttributeError("a bug in the engine")

    monkeypatch.setattr(server.engine, "execute_plan", broken)
    with pytest.raises(ServerError) as caught:
        await client.execute(one_node("p", "PassThrough"), {"p": np.zeros(1)})
    assert caught.value.code == grpc.StatusCode.INTERNAL
    # The bug's details stay in the server log, not in the client's message.
    assert "a bug in the engine" not in caught.value.message


@pytest.mark.parametrize("node_type", ["SlowAsync", "SlowSync"])
async def test_request_deadline_stops_the_node(client: AsyncClient, node_type: str) -> None:
    node_id = unique(node_type)
    with pytest.raises(DeadlineExceededError) as caught:
        await client.execute(one_node(node_id, node_type, params={"seconds": 60}),
                             {node_id: np.zeros(1)}, timeout=1.0)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_for_event(node_id, "cleanup")
    assert events(node_id)[-1] == "cleanup"


async def test_node_timeout_from_the_manifest(client: AsyncClient) -> None:
    node_id = unique("timed")
    manifest = one_node(node_id, "SlowAsync", params={"seconds": 60}, timeout_s=0.2)
    with pytest.raises(DeadlineExceededError) as caught:
        await client.execute(manifest, {node_id: np.zeros(1)})
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"node '{node_id}' exceeded its timeout of 0.2 s" in caught.value.message
    await wait_for_event(node_id, "cleanup")


async def test_node_within_its_timeout_succeeds(client: AsyncClient) -> None:
    node_id = unique("quick")
    manifest = one_node(node_id, "SlowAsync", params={"seconds": 0}, timeout_s=30)
    result = await client.execute(manifest, {node_id: np.arange(3)})
    np.testing.assert_array_equal(result[node_id], np.arange(3))
    assert events(node_id) == ["initialize", "process", "cleanup"]


@pytest.mark.parametrize("node_type", ["SlowAsync", "SlowSync"])
async def test_client_cancellation_runs_cleanup(client: AsyncClient, node_type: str) -> None:
    node_id = unique(node_type)
    task = asyncio.ensure_future(client.execute(
        one_node(node_id, node_type, params={"seconds": 60}), {node_id: np.zeros(1)}))
    await wait_for_event(node_id, "process")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for_event(node_id, "cleanup")
    assert events(node_id)[-1] == "cleanup"


async def test_cancelling_a_raw_grpc_call_runs_cleanup(target: str) -> None:
    from tensorline.wire import PortItem, encode_execute_request

    node_id = unique("raw-cancel")
    request = encode_execute_request(
        json.dumps(one_node(node_id, "SlowAsync", params={"seconds": 60})),
        [PortItem(node_id, "", np.zeros(1))])
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary("/tensorline.v1.PipelineService/ExecutePipeline")(request)
        await wait_for_event(node_id, "process")
        assert call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    await wait_for_event(node_id, "cleanup")


async def test_blocking_client_deadline(target: str) -> None:
    node_id = unique("blocking")

    def call() -> None:
        with Client(target) as client:
            client.execute(one_node(node_id, "SlowSync", params={"seconds": 60}),
                           {node_id: np.zeros(1)}, timeout=1.0)

    with pytest.raises(DeadlineExceededError):
        await asyncio.to_thread(call)
    await wait_for_event(node_id, "cleanup")


async def test_unreachable_server_is_transport_error(
        server_factory: Callable[..., Any]) -> None:
    from tensorline.client import TransportError

    server = await server_factory()
    port = server.port
    await server.stop(grace=0)
    async with AsyncClient(f"127.0.0.1:{port}", retry_unavailable=False) as client:
        with pytest.raises(TransportError) as caught:
            await client.execute(one_node("p", "PassThrough"), {"p": np.zeros(1)}, timeout=5)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert isinstance(caught.value, TensorlineError)


async def test_node_timeout_stops_a_sync_node(client: AsyncClient) -> None:
    node_id = unique("timed-sync")
    manifest = one_node(node_id, "SlowSync", params={"seconds": 60}, timeout_s=0.2)
    with pytest.raises(DeadlineExceededError, match="exceeded its timeout"):
        await client.execute(manifest, {node_id: np.zeros(1)})
    await wait_for_event(node_id, "cleanup")


async def test_cancellation_of_a_warm_instance_does_not_stick(client: AsyncClient) -> None:
    """A reusable node abandoned by a deadline must not see "cancelled" in later requests."""
    manifest = one_node("warm", "WarmSlowSync")
    with pytest.raises(DeadlineExceededError):
        await client.execute(manifest, {"warm": np.asarray(60.0)}, timeout=0.3)
    async with asyncio.timeout(10):
        while True:  # the abandoned call notices the cancellation, then the flag must clear
            result = await client.execute(manifest, {"warm": np.asarray(0.0)})
            if not bool(result["warm"]):
                break
            await asyncio.sleep(0.01)
    result = await client.execute(manifest, {"warm": np.asarray(0.05)})
    assert not bool(result["warm"])


@pytest.mark.parametrize(("node_type", "expected"), [
    ("FailProcess", ["initialize", "cleanup"]),
    ("FailInit", ["cleanup"]),
])
async def test_cleanup_runs_after_a_node_error(client: AsyncClient, node_type: str,
                                               expected: list[str]) -> None:
    node_id = unique(node_type)
    with pytest.raises(NodeError):
        await client.execute(one_node(node_id, node_type), {node_id: np.zeros(1)})
    # The error is returned only after the node was cleaned up: no polling needed.
    assert events(node_id) == expected


@pytest.mark.parametrize(("how", "text"), [
    ("bare", "a node with 2 outputs must return a mapping of port -> value"),
    ("unknown", "returned unknown output port(s) ['c']; declared: ['a', 'b']"),
    ("missing", "produced no value for output 'b'"),
    ("none", "produced no value for output 'b'"),
    ("kind", "output 'a' is declared tensor but the node returned text (str)"),
])
async def test_output_contract_violations_are_node_errors(client: AsyncClient, how: str,
                                                          text: str) -> None:
    manifest = one_node("breaker", "ContractBreaker", params={"how": how})
    with pytest.raises(NodeError) as caught:
        await client.execute(manifest, {"breaker": np.zeros(1)})
    assert caught.value.exception_type == "TypeError"
    assert caught.value.node_id == "breaker"
    assert text in caught.value.message
    fine = await client.execute(one_node("breaker", "ContractBreaker", params={"how": "fine"}),
                                {"breaker": np.zeros(1)})
    assert set(fine.outputs) == {"breaker:a", "breaker:b"}


async def test_constructor_failure_is_a_node_error(client: AsyncClient) -> None:
    with pytest.raises(NodeError) as caught:
        await client.execute(one_node("ctor", "BadConstructor"), {"ctor": np.zeros(1)})
    assert caught.value.exception_type == "LookupError"
    assert "no such device" in caught.value.message
