"""Request validation through a real server: status code, BadRequest violations, readable text."""

from __future__ import annotations

import itertools
import json
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tensorline.client import (
    AsyncClient,
    InvalidRequestError,
    Json,
    LimitExceededError,
    NodeError,
    PermissionDeniedError,
    PortItem,
    from_rpc_error,
)
from tensorline.v1 import tensorline_pb2 as pb

EXECUTE = "/tensorline.v1.PipelineService/ExecutePipeline"


def manifest(*nodes: dict[str, Any], connections: list[dict[str, Any]] | None = None,
             **extra: Any) -> dict[str, Any]:
    return {"version": "v1", "nodes": list(nodes), "connections": connections or [], **extra}


def node(node_id: str, node_type: str, **extra: Any) -> dict[str, Any]:
    return {"id": node_id, "node_type": node_type, **extra}


async def invalid(client: AsyncClient, data: Any, inputs: Any = None) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        await client.execute(data, inputs)
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_REQUEST"
    assert error.violations, "INVALID_ARGUMENT must carry BadRequest field violations"
    return error


def by_field(error: InvalidRequestError) -> dict[str, str]:
    return {v.field: v.description for v in error.violations}


async def test_unknown_and_misspelled_fields_suggest_the_right_name(client: AsyncClient) -> None:
    data = {
        "version": "v1",
        "nodez": [],
        "nodes": [{"id": "a", "node_typ": "Scale", "node_type": "Scale", "parms": {}}],
        "connections": [{"from": "a", "too": "a"}],
    }
    error = await invalid(client, data)
    fields = by_field(error)
    # A manifest-level typo hides none of the problems further down.
    assert fields["nodez"] == "unknown field 'nodez' (did you mean 'nodes'?)"
    assert fields["nodes[0].node_typ"] == "unknown field 'node_typ' (did you mean 'node_type'?)"
    assert fields["nodes[0].parms"] == "unknown field 'parms' (did you mean 'params'?)"
    assert "did you mean 'to'" in fields["connections[0].too"]
    assert "node_typ" in error.message


async def test_a_top_level_typo_hides_no_other_problem(client: AsyncClient) -> None:
    data = {"version": "v1",
            "nodes": [node("a", "Nope"), node("s", "Scale", params={"factr": 2})],
            "conections": [{"from": "a", "to": "s"}]}
    fields = by_field(await invalid(client, data))
    assert set(fields) == {"conections", "nodes[0].node_type", "nodes[1].params.factr"}
    assert fields["conections"] == "unknown field 'conections' (did you mean 'connections'?)"


async def test_a_bad_version_hides_no_other_problem(client: AsyncClient) -> None:
    data = {"version": "v9", "nodes": [node("a", "Nope")]}
    assert set(by_field(await invalid(client, data))) == {"version", "nodes[0].node_type"}


async def test_a_node_field_typo_keeps_the_node_for_the_connections(client: AsyncClient) -> None:
    data = manifest({"id": "src", "node_typ": "PassThrough"}, node("s", "Scale"),
                    {"id": "src2", "node_type": "PassThrough", "runtime_hnt": "sandbox"},
                    connections=[{"from": "src", "to": "s"},
                                 {"from": "src2", "from_port": "nope", "to": "s"},
                                 {"from": "s", "to": "ghost"}])
    fields = by_field(await invalid(client, data))
    assert fields == {
        "nodes[0].node_type": "Field required",
        "nodes[0].node_typ": "unknown field 'node_typ' (did you mean 'node_type'?)",
        "nodes[2].runtime_hnt": "unknown field 'runtime_hnt' (did you mean 'runtime_hint'?)",
        # src2 is still checked as a node, ports included, despite its typo.
        "connections[1].from_port": "node 'src2' has no output port 'nope' (output ports: out)",
        "connections[2].to": "no node 'ghost'",
    }


async def test_misspelled_params_are_not_checked_as_missing(client: AsyncClient) -> None:
    data = manifest(node("r", "AudioResample", paramz={"target_rate": 16000}),
                    node("r2", "AudioResample", params={}, runtime_hnt="auto"))
    fields = by_field(await invalid(client, data))
    # r's params are under a typo: "target_rate: Field required" would be a false problem;
    # r2 gave its params (empty) and they are checked.
    assert set(fields) == {"nodes[0].paramz", "nodes[1].runtime_hnt",
                           "nodes[1].params.target_rate"}


async def test_a_connection_field_typo_checks_only_its_nodes(client: AsyncClient) -> None:
    data = manifest(node("sp", "Split"), node("p", "PassThrough"),
                    {"id": "bad id", "node_type": "Add"},
                    connections=[{"from": "sp", "from_prot": "first", "to": "p"},
                                 {"from": "sp", "from_prot": "second", "to": "ghost"},
                                 {"from": "bad id", "to": "p", "to_port": "in"}])
    fields = by_field(await invalid(client, data))
    # No "sp has 2 output ports; name one" (the port name is what was misspelled), and no
    # "no node 'bad id'" (its own problem is reported where it is declared).
    assert set(fields) == {"connections[0].from_prot", "connections[1].from_prot",
                           "connections[1].to", "nodes[2].id"}


async def test_duplicate_ids(client: AsyncClient) -> None:
    error = await invalid(client, manifest(node("a", "PassThrough"), node("a", "Scale")))
    assert by_field(error) == {
        "nodes[1].id": "duplicate node id 'a' (first used by nodes[0])"}


async def test_unknown_node_type_lists_known_types(client: AsyncClient) -> None:
    error = await invalid(client, manifest(node("a", "Scael")))
    description = by_field(error)["nodes[0].node_type"]
    assert "unknown node type 'Scael'" in description
    assert "did you mean 'Scale'" in description
    for known in ("Add", "AudioResample", "Calculator", "Cast", "Normalize", "PassThrough",
                  "Reshape", "Scale"):
        assert known in description


async def test_connections_to_missing_nodes_and_ports(client: AsyncClient) -> None:
    data = manifest(
        node("split", "Split"), node("cat", "Concat"), node("p", "PassThrough"),
        connections=[
            {"from": "splt", "to": "p"},                                  # missing node
            {"from": "p", "to": "ghost"},                                 # missing node
            {"from": "split", "to": "cat", "to_port": "a"},               # ambiguous from_port
            {"from": "split", "from_port": "third", "to": "cat", "to_port": "b"},  # no such port
            {"from": "p", "to": "cat", "to_port": "c"},                   # no such input port
        ])
    fields = by_field(await invalid(client, data))
    assert fields["connections[0].from"] == "no node 'splt' (did you mean 'split'?)"
    assert fields["connections[1].to"] == "no node 'ghost'"
    assert "has 2 output ports (first, second); name one" in fields["connections[2].from_port"]
    assert "no output port 'third'" in fields["connections[3].from_port"]
    assert "no input port 'c' (input ports: a, b)" in fields["connections[4].to_port"]


async def test_port_fed_twice(client: AsyncClient) -> None:
    data = manifest(node("a", "PassThrough"), node("b", "PassThrough"), node("s", "Scale"),
                    connections=[{"from": "a", "to": "s"}, {"from": "b", "to": "s"}])
    fields = by_field(await invalid(client, data))
    assert "already fed by 'a'" in fields["connections[1]"]


async def test_cycle_shows_the_path(client: AsyncClient) -> None:
    data = manifest(node("d", "PassThrough"), node("a", "Add"), node("b", "PassThrough"),
                    node("c", "PassThrough"),
                    connections=[{"from": "d", "to": "a"}, {"from": "a", "to": "b"},
                                 {"from": "b", "to": "c"}, {"from": "c", "to": "a"}])
    description = by_field(await invalid(client, data))["connections"]
    assert description.startswith("cycle: ")
    path = description.removeprefix("cycle: ").split(" -> ")
    assert path[0] == path[-1]
    assert sorted(path[:-1]) == ["a", "b", "c"]
    # Consecutive entries follow the data flow (a -> b -> c -> a, in some rotation).
    flow = {"a": "b", "b": "c", "c": "a"}
    assert all(flow[x] == y for x, y in itertools.pairwise(path))


async def test_self_loop_is_a_cycle(client: AsyncClient) -> None:
    data = manifest(node("a", "PassThrough"), connections=[{"from": "a", "to": "a"}])
    assert by_field(await invalid(client, data))["connections"] == "cycle: a -> a"


async def test_params_failing_the_schema_name_node_and_field(client: AsyncClient) -> None:
    data = manifest(
        node("s", "Scale", params={"factor": "lots"}),
        node("r", "Reshape", params={"shape": [2, "x"]}),
        node("c", "Cast", params={"dtype": "float128"}),
        node("n", "Normalize", params={"std": -1, "extra": 1}),
        node("res", "AudioResample"),
    )
    fields = by_field(await invalid(client, data))
    assert fields["nodes[0].params.factor"].startswith("node 's': ")
    assert "number" in fields["nodes[0].params.factor"]
    assert fields["nodes[1].params.shape[1]"].startswith("node 'r': ")
    assert "dtype float128 is not supported; use one of bool" in fields["nodes[2].params.dtype"]
    assert "greater than 0" in fields["nodes[3].params.std"]
    assert "unknown field 'extra'" in fields["nodes[3].params.extra"]
    assert fields["nodes[4].params.target_rate"] == "node 'res': Field required"


async def test_bad_runtime_hint(client: AsyncClient) -> None:
    fields = by_field(await invalid(client, manifest(node("a", "PassThrough", runtime_hint="gpu"))))
    description = fields["nodes[0].runtime_hint"]
    assert "unknown runtime hint 'gpu'" in description
    assert "cpython" in description and "rust_python" in description


async def test_bad_version_and_empty_nodes(client: AsyncClient) -> None:
    fields = by_field(await invalid(client, {"version": "v2", "nodes": []}))
    assert set(fields) == {"version", "nodes"}


async def test_inputs_for_unknown_nodes_and_ports(client: AsyncClient) -> None:
    data = manifest(node("cat", "Concat"), node("p", "PassThrough"))
    inputs = [
        PortItem("cat", "a", np.zeros(1)),
        PortItem("cat", "b", np.zeros(1)),
        PortItem("p", "", np.zeros(1)),
        PortItem("ghost", "", np.zeros(1)),
        PortItem("cat", "c", np.zeros(1)),
        PortItem("cat", "", np.zeros(1)),
    ]
    fields = by_field(await invalid(client, data, inputs))
    assert fields["inputs[3].node_id"].startswith("no node 'ghost' in the manifest")
    assert "no input port 'c' (inputs: a, b)" in fields["inputs[4].port"]
    assert "name the port" in fields["inputs[5].port"]


async def test_an_input_naming_only_the_node_feeds_its_only_required_port(
        client: AsyncClient) -> None:
    """OptionalBias: a required 'x' and an optional 'bias'; the node's name alone means 'x'
    (in a request with another input too, so the slow binding path is taken as well)."""
    data = manifest(node("ob", "OptionalBias"), node("p", "PassThrough"))
    result = await client.execute(data, {"ob": np.arange(3.0), "p": np.zeros(1)})
    np.testing.assert_array_equal(result["ob"], [0.0, 1.0, 2.0])
    result = await client.execute(data, [PortItem("ob", "", np.arange(3.0)),
                                         PortItem("ob", "bias", np.ones(3)),
                                         PortItem("p", "", np.zeros(1))])
    np.testing.assert_array_equal(result["ob"], [1.0, 2.0, 3.0])
    # Ambiguous (two required ports): one problem naming the ports, no "missing input" too.
    fields = by_field(await invalid(client, manifest(node("cat", "Concat")),
                                    [PortItem("cat", "", np.zeros(1))]))
    assert fields == {"inputs[0].port": "node 'cat' has 2 inputs fed by the request (a, b); "
                                        "name the port (e.g. 'cat:a')"}


async def test_input_to_a_connected_port(client: AsyncClient) -> None:
    data = manifest(node("a", "PassThrough"), node("b", "Scale"),
                    connections=[{"from": "a", "to": "b"}])
    fields = by_field(await invalid(client, data, {"a": np.zeros(1), "b:in": np.zeros(1)}))
    assert fields["inputs[1]"] == "input port 'in' of node 'b' is fed by node 'a', not by the request"
    # Without a port name: the node has no request-fed port at all.
    fields = by_field(await invalid(client, data, {"a": np.zeros(1), "b": np.zeros(1)}))
    assert fields["inputs[1]"] == ("node 'b' takes no input from the request: its input ports "
                                   "are fed by other nodes ('in' by node 'a')")


async def test_missing_required_inputs(client: AsyncClient) -> None:
    data = manifest(node("cat", "Concat"), node("s", "Scale"), node("bias", "OptionalBias"))
    error = await invalid(client, data, {"cat:a": np.zeros(1)})
    descriptions = [v.description for v in error.violations if v.field == "inputs"]
    assert sorted(descriptions) == [
        "missing input for node 'bias' port 'x'",
        "missing input for node 'cat' port 'b'",
        "missing input for node 's' port 'in'",
    ]


async def test_second_value_for_a_single_port(client: AsyncClient) -> None:
    data = manifest(node("s", "Scale"))
    error = await invalid(client, data, [PortItem("s", "", np.zeros(1)),
                                         PortItem("s", "in", np.ones(1))])
    assert "a second value for node 's' port 'in'" in by_field(error)["inputs[1]"]


async def test_wrong_value_kind_for_a_port(client: AsyncClient) -> None:
    data = manifest(node("s", "Scale"), node("calc", "Calculator"), node("up", "TextOnly"))
    error = await invalid(client, data, {"s": "not a tensor", "calc": np.zeros(2),
                                         "up": Json("text?")})
    fields = by_field(error)
    assert fields["inputs[0].value"] == "node 's' port 'in' takes tensor, got text"
    assert fields["inputs[1].value"] == "node 'calc' port 'in' takes json, got tensor"
    assert fields["inputs[2].value"] == "node 'up' port 'in' takes text, got json"


async def test_invalid_json_manifest(client: AsyncClient) -> None:
    error = await invalid(client, '{"version": "v1", "nodes": [}')
    assert by_field(error)["manifest_json"].startswith("invalid JSON: ")
    assert "line 1 column" in by_field(error)["manifest_json"]


@pytest.mark.parametrize(("text", "expected"), [
    ("", "empty manifest"),
    ("[1, 2]", "must be a JSON object, got list"),
])
async def test_manifest_that_is_not_an_object(target: str, text: str, expected: str) -> None:
    error = await raw_call(target, pb.ExecuteRequest(manifest_json=text))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details()


async def raw_call(target: str, request: pb.ExecuteRequest | bytes) -> grpc.aio.AioRpcError:
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(EXECUTE)(raw)
    return caught.value


def violations_of(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    out = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


async def test_tensor_byte_length_must_match_shape(target: str) -> None:
    request = pb.ExecuteRequest(
        manifest_json='{"nodes": [{"id": "p", "node_type": "PassThrough"}]}',
        inputs=[pb.PortValue(node_id="p", value=pb.Value(tensor=pb.Tensor(
            dtype=pb.DTYPE_FLOAT32, shape=[2, 3], data=b"\x00" * 23)))])
    error = await raw_call(target, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = violations_of(error)
    assert fields == {"inputs[0].value.tensor.data":
                      "23 bytes but shape [2, 3] of float32 needs 6 x 4 = 24 bytes"}
    assert "23 bytes" in error.details()


async def test_malformed_request_bytes(target: str) -> None:
    error = await raw_call(target, b"\x12\x10\x0a")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed ExecuteRequest" in violations_of(error)["request"]


async def test_oversize_tensor_is_resource_exhausted(server_factory: Any) -> None:
    server = await server_factory(max_tensor_bytes=64)
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        with pytest.raises(LimitExceededError) as caught:
            await client.execute(manifest(node("s", "Scale")), {"s": np.zeros(9)})
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.violations[0].field == "inputs[0].value.tensor.data"
    assert "exceeds the server limit of 64 bytes" in caught.value.violations[0].description


async def test_several_problems_reported_together(client: AsyncClient) -> None:
    data = manifest(
        node("a", "PassThrough"),
        node("a", "PassThrough"),
        node("b", "Nope"),
        node("s", "Scale", params={"factr": 2}),
        node("h", "PassThrough", runtime_hint="quantum"),
        connections=[{"from": "a", "to": "zzz"}, {"from": "s", "to": "h"},
                     {"from": "h", "to": "s"}],
    )
    fields = by_field(await invalid(client, data))
    assert set(fields) == {"nodes[1].id", "nodes[2].node_type", "nodes[3].params.factr",
                           "nodes[4].runtime_hint", "connections[0].to", "connections"}
    assert fields["nodes[3].params.factr"] == (
        "node 's': unknown field 'factr' (did you mean 'factor'?)")
    assert fields["connections"].startswith("cycle: ")


async def test_manifest_and_codec_problems_reported_together(target: str) -> None:
    request = pb.ExecuteRequest(
        manifest_json='{"nodes": [{"id": "p", "node_type": "PassThruogh"}]}',
        inputs=[pb.PortValue(node_id="p", value=pb.Value(tensor=pb.Tensor(
            dtype=pb.DTYPE_INT16, shape=[4], data=b"\x00" * 7)))])
    error = await raw_call(target, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations_of(error)) == {"inputs[0].value.tensor.data", "nodes[0].node_type"}


async def test_untrusted_node_with_inprocess_hint_is_permission_denied(
        server_factory: Any) -> None:
    server = await server_factory(node_modules=["tests.nodes.basic"],
                                  untrusted_modules=["tests.nodes.spine"])
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        with pytest.raises(PermissionDeniedError) as caught:
            await client.execute(manifest(node("p", "Probe", runtime_hint="cpython")),
                                 {"p": np.zeros(1)})
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "untrusted" in caught.value.message
        # Without a hint it runs sandboxed, by the trust policy.
        result = await client.execute(manifest(node("p", "Probe")), {"p": np.zeros(1)})
        metrics = result.metrics.nodes[0]
        assert metrics.runtime == "sandbox"
        assert metrics.selection_reason.startswith("trust policy")
        catalogue = {n.node_type: n for n in await client.list_nodes()}
        assert catalogue["Probe"].trusted is False
        assert list(catalogue["Probe"].allowed_runtimes) == ["sandbox"]


async def test_untrusted_node_is_refused_by_a_server_without_sandbox(server_factory: Any) -> None:
    """Without a sandbox an untrusted module cannot be loaded at all (it is never imported in
    the server): its node types are unknown, and the error says which module and why."""
    server = await server_factory(node_modules=["tests.nodes.basic"],
                                  untrusted_modules=["tests.nodes.spine"], sandbox=False)
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        with pytest.raises(InvalidRequestError) as caught:
            await client.execute(manifest(node("p", "Probe")), {"p": np.zeros(1)})
        (violation,) = caught.value.violations
        assert violation.field == "nodes[0].node_type"
        assert "module tests.nodes.spine is not loaded" in violation.description
        assert "no sandbox runtime" in violation.description


async def test_corrupted_requests_never_cause_internal_errors(target: str) -> None:
    """Byte-level corruption of valid requests (seeded, so the same on every run): the server
    answers OK or a client-error status, never INTERNAL (or a bare UNKNOWN)."""
    import random

    from tensorline.wire import encode_execute_request

    rng = random.Random(20261128)
    manifest = json.dumps({"version": "v1", "nodes": [
        {"id": "src", "node_type": "PassThrough"},
        {"id": "s", "node_type": "Scale", "params": {"factor": 2}},
        {"id": "cat", "node_type": "Concat"}],
        "connections": [{"from": "src", "to": "s"}]})
    base = encode_execute_request(manifest, [
        PortItem("src", "", np.arange(6, dtype=np.float32).reshape(2, 3)),
        PortItem("cat", "a", np.arange(3, dtype=np.int16)),
        PortItem("cat", "b", np.arange(2, dtype=np.int16))])
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
               grpc.StatusCode.RESOURCE_EXHAUSTED}
    seen: set[grpc.StatusCode] = set()
    async with grpc.aio.insecure_channel(target) as channel:
        execute = channel.unary_unary(EXECUTE)
        for _ in range(300):
            raw = bytearray(base)
            for _ in range(rng.randint(1, 3)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            if rng.random() < 0.2:
                raw = raw[:rng.randrange(len(raw))]
            try:
                await execute(bytes(raw), timeout=10)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                # A node may fail on odd but valid values: that is the node's error, fine here.
                code = (grpc.StatusCode.OK if isinstance(from_rpc_error(error), NodeError)
                        else error.code())
            assert code in allowed, (code, bytes(raw))
            seen.add(code)
    assert grpc.StatusCode.INVALID_ARGUMENT in seen
