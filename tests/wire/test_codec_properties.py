"""Property tests of the wire codec: lossless round trips, and bad bytes never raise."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tensorline.client import Audio, Json, PortItem, Tagged
from tensorline.v1 import tensorline_pb2 as pb
from tensorline.wire import (
    SUPPORTED_DTYPES,
    Limits,
    decode_execute_request,
    decode_execute_response,
    encode_execute_request,
    encode_execute_response,
    encode_execution_metrics,
    scan_top_level,
)

PROFILE = settings(max_examples=150, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow])

dtypes = st.sampled_from(SUPPORTED_DTYPES).flatmap(
    lambda name: st.sampled_from(
        [np.dtype(name)] if np.dtype(name).itemsize == 1 or name == "bool"
        else [np.dtype(name), np.dtype(name).newbyteorder(">")]))

arrays = dtypes.flatmap(lambda dt: hnp.arrays(
    dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))

# A strided view of an array: non-contiguous input the encoder must normalize.
strided = arrays.filter(lambda a: a.ndim >= 1).map(lambda a: a[::-1][::2])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=4),
    max_leaves=12,
)

audio = st.builds(
    Audio,
    st.sampled_from(["<i2", "<i4", "<f4", ">i2"]).flatmap(lambda dt: hnp.arrays(
        np.dtype(dt), hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=6))),
    st.integers(min_value=1, max_value=384000),
)

bare_values = (arrays | strided | audio | st.text() | st.builds(Json, json_values)
               | st.binary(max_size=64))
values = bare_values | st.builds(
    Tagged, bare_values, st.dictionaries(st.text(max_size=8), st.text(max_size=8), min_size=1, max_size=3))

ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789.-", max_size=12)
items = st.lists(st.builds(PortItem, ids, ids, values), max_size=5)


def assert_same_value(got: Any, sent: Any) -> None:
    if isinstance(sent, Tagged):
        assert isinstance(got, Tagged)
        assert got.metadata == sent.metadata
        got, sent = got.value, sent.value
    if isinstance(sent, np.ndarray):
        assert isinstance(got, np.ndarray)
        assert got.dtype == sent.dtype.newbyteorder("<") or got.dtype == sent.dtype
        assert got.shape == sent.shape
        np.testing.assert_array_equal(got, sent)
    elif isinstance(sent, Audio):
        assert isinstance(got, Audio)
        assert got.sample_rate == sent.sample_rate
        assert_same_value(got.samples, sent.samples)
    elif isinstance(sent, bytes):
        assert bytes(got) == sent
    else:
        assert type(got) is type(sent)
        assert got == sent


@PROFILE
@given(manifest=st.text(), inputs=items, pipeline=st.text(),
       version=st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_request_round_trip(manifest: str, inputs: list[PortItem], pipeline: str,
                            version: int) -> None:
    raw = encode_execute_request(manifest, inputs, pipeline, version)
    decoded = decode_execute_request(raw)
    assert decoded.violations == []
    assert decoded.manifest_json == manifest
    assert (decoded.pipeline, decoded.pipeline_version) == (pipeline, version)
    assert decoded.size == len(raw)
    assert len(decoded.inputs) == len(inputs)
    for got, sent in zip(decoded.inputs, inputs, strict=True):
        assert (got.node_id, got.port) == (sent.node_id, sent.port)
        assert_same_value(got.value, sent.value)


@PROFILE
@given(outputs=items, total=st.floats(min_value=0, max_value=1e6), cached=st.booleans())
def test_response_round_trip(outputs: list[PortItem], total: float, cached: bool) -> None:
    metrics = pb.ExecutionMetrics(total_ms=total, plan_cached=cached,
                                  nodes=[pb.NodeMetrics(node_id="n", runtime="inprocess")])
    decoded = decode_execute_response(encode_execute_response(outputs, metrics))
    assert decoded.metrics == metrics
    for got, sent in zip(decoded.outputs, outputs, strict=True):
        assert (got.node_id, got.port) == (sent.node_id, sent.port)
        assert_same_value(got.value, sent.value)


@PROFILE
@given(array=arrays)
def test_generated_protobuf_parses_codec_output(array: np.ndarray) -> None:
    """The hand-framed encoding is plain protobuf: the generated classes agree with it."""
    raw = encode_execute_request("{}", [PortItem("n", "p", array)])
    message = pb.ExecuteRequest.FromString(raw)
    tensor = message.inputs[0].value.tensor
    assert list(tensor.shape) == list(array.shape)
    little = array.astype(array.dtype.newbyteorder("<"))
    assert tensor.data == np.ascontiguousarray(little).tobytes()


@PROFILE
@given(array=arrays, limit=st.integers(min_value=1, max_value=200))
def test_tensor_limit_is_a_limit_violation(array: np.ndarray, limit: int) -> None:
    decoded = decode_execute_request(encode_execute_request("{}", [PortItem("n", "", array)]),
                                     Limits(max_tensor_bytes=limit))
    if array.nbytes > limit:
        assert [v.kind for v in decoded.violations] == ["limit"]
        assert decoded.inputs[0].value is None
    else:
        assert decoded.violations == []


@PROFILE
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    decoded = decode_execute_request(raw)
    for violation in decoded.violations:
        assert violation.field and violation.description


@PROFILE
@given(inputs=items.filter(bool), data=st.data())
def test_truncated_request_reports_violation(inputs: list[PortItem], data: st.DataObject) -> None:
    raw = encode_execute_request('{"nodes": []}', inputs)
    boundaries = {0} | {b for _, _, _, b in scan_top_level(raw)}
    cut = data.draw(st.integers(min_value=1, max_value=len(raw) - 1))
    decoded = decode_execute_request(raw[:cut])
    if cut not in boundaries:
        assert decoded.violations, f"cut at {cut} of {len(raw)} went unnoticed"


@PROFILE
@given(inputs=items.filter(bool), data=st.data())
def test_corrupted_request_never_raises(inputs: list[PortItem], data: st.DataObject) -> None:
    raw = bytearray(encode_execute_request("{}", inputs))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        position = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
        raw[position] = data.draw(st.integers(min_value=0, max_value=255))
    decode_execute_request(bytes(raw))


def test_crafted_edge_cases_yield_violations() -> None:
    def request(value: pb.Value) -> bytes:
        return pb.ExecuteRequest(manifest_json="{}", inputs=[
            pb.PortValue(node_id="n", value=value)]).SerializeToString()

    # A zero-size tensor whose other dimension is absurdly large.
    huge = request(pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[0, 2**62])))
    # More dimensions than numpy supports.
    many = request(pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[1] * 100, data=b"x")))
    # A metadata entry (Value field 15) whose key is not UTF-8.
    value = b"\x1a\x01x" + b"\x7a\x04\x0a\x02\xff\xfe"
    port_value = b"\x0a\x01n\x1a" + bytes([len(value)]) + value
    bad_meta = b"\x0a\x02{}\x12" + bytes([len(port_value)]) + port_value
    cases = {"huge": (huge, "inputs[0].value.tensor.shape"),
             "many": (many, "inputs[0].value.tensor.shape"),
             "bad_meta": (bad_meta, "inputs[0].value.metadata")}
    for name, (raw, field) in cases.items():
        decoded = decode_execute_request(raw)
        assert [v.field for v in decoded.violations] == [field], name
    # Negative dimensions, unknown dtype, wrong byte count, empty value.
    for value in (
        pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_INT8, shape=[-1], data=b"")),
        pb.Value(tensor=pb.Tensor(dtype=99, shape=[1], data=b"x")),
        pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_INT32, shape=[2], data=b"abc")),
        pb.Value(),
        pb.Value(audio=pb.Audio(samples=pb.Tensor(dtype=pb.DTYPE_INT16, shape=[1], data=b"ab"))),
        pb.Value(json="{not json"),
        pb.Value(audio=pb.Audio(sample_rate=8000)),
        pb.Value(audio=pb.Audio(sample_rate=8000, samples=pb.Tensor(
            dtype=pb.DTYPE_INT16, shape=[1, 1, 1], data=b"ab"))),
        pb.Value(audio=pb.Audio(sample_rate=-3, samples=pb.Tensor(
            dtype=pb.DTYPE_INT16, shape=[1], data=b"ab"))),
    ):
        decoded = decode_execute_request(request(value))
        assert len(decoded.violations) == 1, value
        assert decoded.violations[0].field.startswith("inputs[0].value"), decoded.violations


def test_packed_shape_ending_inside_a_varint_is_malformed() -> None:
    """The last shape byte says "more follows": the decoder must not read the next field."""
    from tensorline.wire._codec import _varint_bytes

    data = b"\x00" * 3330  # 0x82 followed by the data tag 0x1a would read as 3330
    tensor = b"\x08\x06" + b"\x12\x01\x82" + b"\x1a" + _varint_bytes(len(data)) + data
    value = b"\x0a" + _varint_bytes(len(tensor)) + tensor
    port_value = b"\x0a\x01n" + b"\x1a" + _varint_bytes(len(value)) + value
    raw = b"\x12" + _varint_bytes(len(port_value)) + port_value
    decoded = decode_execute_request(raw)
    assert [v.field for v in decoded.violations] == ["request"]
    assert "packed shape ends inside a varint" in decoded.violations[0].description


def test_unpacked_shape_is_accepted() -> None:
    """proto3 parsers must accept a repeated scalar sent unpacked (one tag per element)."""
    from tensorline.wire._codec import _varint_bytes

    data = np.arange(6, dtype="<i2").tobytes()
    tensor = b"\x08\x03" + b"\x10\x02" + b"\x10\x03" + b"\x1a" + _varint_bytes(len(data)) + data
    value = b"\x0a" + _varint_bytes(len(tensor)) + tensor
    port_value = b"\x0a\x01n" + b"\x1a" + _varint_bytes(len(value)) + value
    decoded = decode_execute_request(b"\x12" + _varint_bytes(len(port_value)) + port_value)
    assert decoded.violations == []
    np.testing.assert_array_equal(decoded.inputs[0].value, np.arange(6, dtype=np.int16).reshape(2, 3))


native_arrays = st.sampled_from(SUPPORTED_DTYPES).flatmap(lambda name: hnp.arrays(
    np.dtype(name), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))


@PROFILE
@given(node_id=ids, port=ids, array=native_arrays)
def test_small_array_outputs_are_framed_like_the_generated_code(
        node_id: str, port: str, array: np.ndarray[Any, Any]) -> None:
    """The hand-framed fast path for small arrays produces the very bytes protobuf would."""
    metrics = pb.ExecutionMetrics()
    expected = pb.ExecuteResponse(
        outputs=[pb.PortValue(node_id=node_id, port=port, value=pb.Value(tensor=pb.Tensor(
            dtype=WIRE[array.dtype.name], shape=array.shape, data=array.tobytes())))],
        metrics=metrics).SerializeToString()
    assert encode_execute_response([PortItem(node_id, port, array)], metrics) == expected


WIRE = {name: getattr(pb, f"DTYPE_{name.upper()}") for name in SUPPORTED_DTYPES}

reports = st.builds(
    SimpleNamespace, node_id=ids, node_type=ids, runtime=st.sampled_from(["inprocess", "sandbox"]),
    reason=st.text(max_size=30), wall_ms=st.floats(min_value=0, max_value=1e7),
    fallback=st.text(max_size=20), inputs_consumed=st.integers(0, 3),
    outputs_produced=st.integers(0, 3))


@PROFILE
@given(total=st.floats(min_value=0, max_value=1e7), nodes=st.lists(reports, max_size=4),
       cached=st.booleans())
def test_execution_metrics_bytes_parse_to_the_same_message(
        total: float, nodes: list[SimpleNamespace], cached: bool) -> None:
    parsed = pb.ExecutionMetrics.FromString(encode_execution_metrics(total, nodes, cached))
    assert parsed == pb.ExecutionMetrics(total_ms=total, plan_cached=cached, nodes=[
        pb.NodeMetrics(node_id=n.node_id, node_type=n.node_type, runtime=n.runtime,
                       selection_reason=n.reason, wall_ms=n.wall_ms, fallback=n.fallback,
                       inputs_consumed=n.inputs_consumed, outputs_produced=n.outputs_produced)
        for n in nodes])
