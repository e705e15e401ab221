"""Every fast path of the codec decodes (or encodes) exactly what its general path does.

Fast paths (each returns None, "not mine", whenever the general path must decide):

* ``_unary._decode_small_request``: small ExecuteRequests through the generated parser (its
  tensors made by the codec's ``_tensor``, which the one tensor decoder ``_decode_tensor`` ends
  in), versus the zero-copy scan of ``decode_execute_request``;
* ``_unary.LAYOUTS`` (``_layouts``): an ExecuteRequest that repeats the layout of one decoded
  before, its arrays made at the learned offsets without parsing; every request is decoded three
  times (seen, learned, by its layout), then again with other tensor data;
* ``_streams.CHUNK_LAYOUTS`` and ``RESULT_LAYOUTS``: the same for StreamRequest data chunks
  and single StreamResponse results (everything after the sequence number compared);
* ``_unary.RESPONSE_LAYOUTS``: the same for ExecuteResponses (the metrics at the end parsed);
* ``_streams._fast_stream_chunk``: a chunk of one tensor scanned inline (the tensor by
  ``_decode_tensor``), versus the general walk of ``decode_stream_chunk`` (used by
  ``decode_stream_request`` and ``decode_stream_response``);
* ``_unary._tensor_output``: an ExecuteResponse output framed flat (the tensor by the one
  encoder ``_codec._encode_tensor``), then again from the head it kept, versus
  ``encode_port_value``; ``_encode_tensor``, ``encode_execution_metrics`` and
  ``encode_execute_request`` (the client's side: its manifest fields and its inputs' heads
  kept and reused) versus the generated serializer.

Decoders are compared by running each public decoder twice on the same bytes, once as is and
once with the fast path switched off: same values (bit-exact arrays, dtype, shape), same
violations (field path, description, kind), same exceptions. Inputs cover every dtype (both byte
orders where the codec accepts them), ranks 0..32 and beyond numpy's limit, zero-size
dimensions, 0-d arrays, and malformed bytes (truncations, corrupted bytes, shape/data mismatch,
unknown dtypes, duplicated and unpacked fields).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tensorline.v1 import tensorline_pb2 as pb
from tensorline.wire import (
    SUPPORTED_DTYPES,
    Limits,
    PortItem,
    StreamItem,
    _codec,
    _layouts,
    _streams,
    _unary,
    decode_execute_request,
    decode_execute_response,
    decode_stream_request,
    decode_stream_response,
    encode_execute_request,
    encode_execution_metrics,
    encode_port_value,
    encode_stream_results,
    join,
    wire_dtype,
)

PROFILE = settings(max_examples=300, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- comparing two decodings ---------------------------------------------------------------------


def _normal(value: Any) -> Any:
    """A comparable form of a decoded value: arrays bit-exact with dtype and shape."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, _codec.Tagged):
        return ("tagged", _normal(value.value), sorted(value.metadata.items()))
    if isinstance(value, _codec.Audio):
        return ("audio", _normal(value.samples), value.sample_rate)
    if isinstance(value, _codec.PortItem):
        return ("item", value.node_id, value.port, _normal(value.value))
    if isinstance(value, _streams.DecodedStreamChunk | StreamItem):
        return ("chunk", value.sequence, _normal(getattr(value, "item", None))
                if isinstance(value, _streams.DecodedStreamChunk)
                else (value.node_id, value.port, _normal(value.value)))
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return ("bytes", bytes(value))
    return (type(value).__name__, value)


def _outcome(decode: Callable[[], Any]) -> Any:
    try:
        return ("ok", decode())
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


class _NoLayouts(_layouts.RequestLayouts):
    def decode(self, raw: bytes, limits: Limits) -> None:
        return None

    def learn(self, *args: Any) -> None:
        return None


class _NoResponseLayouts(_layouts.ResponseLayouts):
    def decode(self, raw: bytes) -> None:
        return None

    def learn(self, *args: Any) -> None:
        return None


class _NoChunkLayouts(_layouts.ChunkLayouts):
    def decode(self, raw: bytes, limits: Limits) -> None:
        return None

    def learn(self, *args: Any) -> None:
        return None


@contextmanager
def _general_only() -> Iterator[None]:
    """Switch every decoding fast path off: each says "not mine"."""
    with mock.patch.object(_unary, "_decode_small_request", lambda raw, limits: None), \
            mock.patch.object(_unary, "LAYOUTS", _NoLayouts()), \
            mock.patch.object(_unary, "RESPONSE_LAYOUTS", _NoResponseLayouts(0)), \
            mock.patch.object(_streams, "CHUNK_LAYOUTS", _NoChunkLayouts(0, 0)), \
            mock.patch.object(_streams, "RESULT_LAYOUTS", _NoChunkLayouts(0, 0)), \
            mock.patch.object(_streams, "_fast_stream_chunk",
                              lambda raw, start, end, limits, out: None):
        yield


def _request_summary(decoded: Any) -> Any:
    return (decoded.manifest_json, decoded.pipeline, decoded.pipeline_version, decoded.size,
            _normal(decoded.inputs),
            [(v.field, v.description, v.kind) for v in decoded.violations])


def _stream_request_summary(decoded: Any) -> Any:
    chunk = decoded.chunk
    return (decoded.kind, decoded.size,
            None if chunk is None else (chunk.sequence, _normal(chunk.item)),
            [(v.field, v.description, v.kind) for v in decoded.violations])


def _execute_response_summary(decoded: Any) -> Any:
    return (_normal(decoded.outputs), decoded.metrics.SerializeToString())


def _stream_response_summary(decoded: Any) -> Any:
    return (decoded.kind, [(r.sequence, r.node_id, r.port, _normal(r.value))
                           for r in decoded.results])


def assert_same_decoding(raw: bytes, limits: Limits) -> None:
    # Seen, learned, then decoded by its layout (when it gets one): each the same.
    fast_reqs = [_outcome(lambda: _request_summary(decode_execute_request(raw, limits)))
                 for _ in range(3)]
    assert fast_reqs[0] == fast_reqs[1] == fast_reqs[2]
    fast_req = fast_reqs[0]
    fast_streams = [_outcome(lambda: _stream_request_summary(decode_stream_request(raw, limits)))
                    for _ in range(3)]
    assert fast_streams[0] == fast_streams[1] == fast_streams[2]
    fast_stream = fast_streams[0]
    fast_resps = [_outcome(lambda: _stream_response_summary(decode_stream_response(raw)))
                  for _ in range(3)]
    assert fast_resps[0] == fast_resps[1] == fast_resps[2]
    fast_resp = fast_resps[0]
    fast_executes = [_outcome(lambda: _execute_response_summary(decode_execute_response(raw)))
                     for _ in range(3)]
    assert fast_executes[0] == fast_executes[1] == fast_executes[2]
    with _general_only():
        general_execute = _outcome(lambda: _execute_response_summary(
            decode_execute_response(raw)))
        general_req = _outcome(lambda: _request_summary(decode_execute_request(raw, limits)))
        general_stream = _outcome(
            lambda: _stream_request_summary(decode_stream_request(raw, limits)))
        general_resp = _outcome(lambda: _stream_response_summary(decode_stream_response(raw)))
    assert fast_req == general_req, "ExecuteRequest: the small-message path differs"
    assert fast_stream == general_stream, "StreamRequest: the fast chunk path differs"
    assert fast_resp == general_resp, "StreamResponse: the fast chunk path differs"
    assert fast_executes[0] == general_execute, "ExecuteResponse: the layout path differs"
    # The request decoders never raise, whichever path decodes.
    assert fast_req[0] == "ok" and fast_stream[0] == "ok"


# --- building messages byte by byte (so they can be anything, not only what protobuf writes) ----


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(number: int, wire_type: int, payload: bytes | int) -> bytes:
    key = varint((number << 3) | wire_type)
    if wire_type == 0:
        assert isinstance(payload, int)
        return key + varint(payload)
    assert isinstance(payload, bytes)
    return key + varint(len(payload)) + payload


DTYPES = [np.dtype(name) for name in SUPPORTED_DTYPES]
# The dtypes the codec accepts from callers: every supported one in both byte orders.
SENDABLE = DTYPES + [d.newbyteorder(">") for d in DTYPES if d.itemsize > 1]


@st.composite
def shapes(draw: st.DrawFn) -> list[int]:
    """Mostly small valid shapes of rank 0..32; sometimes over-limit ranks, zero-size dims
    beside absurd ones, negative or huge dims."""
    kind = draw(st.sampled_from(["small"] * 4 + ["deep", "over", "zero", "odd"]))
    if kind == "small":  # rank 1 most often: the generated-parser path has a shortcut for it
        return draw(st.lists(st.integers(0, 5), min_size=0, max_size=draw(st.sampled_from(
            [1, 1, 4]))))
    if kind == "deep":  # up to numpy-safe sizes at ranks up to 32
        rank = draw(st.integers(0, 32))
        dims = [1] * rank
        for i in draw(st.lists(st.integers(0, max(rank - 1, 0)), max_size=3)):
            if rank:
                dims[i] = draw(st.integers(0, 3))
        return dims
    if kind == "over":  # more dimensions than numpy supports (64), or just past 32
        rank = draw(st.sampled_from([33, 63, 64, 65, 100]))
        return [1] * rank
    if kind == "zero":  # a zero beside dimensions whose product overflows numpy
        return draw(st.permutations([0, 2**62, 2**62, *draw(st.lists(st.integers(1, 3),
                                                                      max_size=2))]))
    return draw(st.lists(st.sampled_from([-1, -(2**63), 2**63 - 1, 2**40, 7]), min_size=1,
                         max_size=3))


@st.composite
def tensor_bodies(draw: st.DrawFn) -> bytes:
    """The body of a Tensor message: well-formed most of the time."""
    dtype_wire = draw(st.sampled_from([wire_dtype(d) for d in DTYPES]) if draw(
        st.integers(0, 3)) else st.sampled_from(
        [0, 15, 99, -1, 2**32 + pb.DTYPE_FLOAT32, 2**31 + 1, 2**63]))
    shape = draw(shapes())
    known = _codec._WIRE_TO_DTYPE.get(dtype_wire)
    itemsize = known.itemsize if known is not None else 1
    count = math.prod(shape) if all(d >= 0 for d in shape) else 0
    size = count * itemsize if count * itemsize <= 4096 else 0
    size = max(0, size + draw(st.sampled_from([0, 0, 0, 0, 1, -1, itemsize])))
    data = draw(st.binary(min_size=size, max_size=size))
    parts = []
    # Fields at their default values are mostly omitted, as protobuf writes them (the parser
    # path only takes canonical encodings).
    if dtype_wire or not draw(st.integers(0, 5)):
        parts.append(field(1, 0, dtype_wire))
    if shape or not draw(st.integers(0, 5)):
        if draw(st.integers(0, 9)) == 0:  # unpacked repeated int64
            parts += [field(2, 0, d) for d in shape]
        else:
            parts.append(field(2, 2, b"".join(varint(d) for d in shape)))
    if data or not draw(st.integers(0, 5)):
        parts.append(field(3, 2, data))
    order = draw(st.sampled_from(["plain"] * 5 + ["shuffled", "duplicated"]))
    if order == "shuffled":
        parts = draw(st.permutations(parts))
    elif order == "duplicated" and parts:
        parts.append(draw(st.sampled_from(parts)))
    return b"".join(parts)


@st.composite
def value_bodies(draw: st.DrawFn) -> bytes:
    body = field(1, 2, draw(tensor_bodies()))
    extra = draw(st.sampled_from(["none"] * 10 + ["text", "binary", "metadata", "tensor2",
                                                  "unknown"]))
    if extra == "text":
        body += field(3, 2, draw(st.text(max_size=5)).encode())
    elif extra == "binary":
        body += field(5, 2, draw(st.binary(max_size=5)))
    elif extra == "metadata":
        body += field(15, 2, field(1, 2, b"k") + field(2, 2, b"v"))
    elif extra == "tensor2":
        body += field(1, 2, draw(tensor_bodies()))
    elif extra == "unknown":
        body += field(9, 0, 1)
    return body


names = st.sampled_from(["", "n", "node_1", "é", "port"])


def name_field(draw: st.DrawFn, number: int) -> bytes:
    """A string field: omitted when empty, mostly (as protobuf writes it)."""
    name = draw(names)
    return b"" if not name and draw(st.integers(0, 3)) else field(number, 2, name.encode())



@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """An ExecuteRequest, a StreamRequest or a StreamResponse (each decoder gets every
    message: bytes meant for another are malformed input too)."""
    kind = draw(st.sampled_from(["execute", "execute", "stream", "stream", "results",
                                 "response"]))
    if kind == "response":
        parts = []
        for _ in range(draw(st.integers(0, 3))):
            port_value = name_field(draw, 1) + name_field(draw, 2)
            if draw(st.integers(0, 19)):
                port_value += field(3, 2, draw(value_bodies()))
            parts.append(field(1, 2, port_value))
        if draw(st.integers(0, 5)):
            parts.append(field(2, 2, pb.ExecutionMetrics(
                total_ms=draw(st.floats(0, 1e6)), plan_cached=draw(st.booleans()),
                nodes=[pb.NodeMetrics(node_id=draw(names), wall_ms=draw(st.floats(0, 1e3)))]
            ).SerializeToString()))
        raw = b"".join(parts)
    elif kind == "execute":
        parts = [field(1, 2, b"{}")]
        for _ in range(draw(st.integers(0, 3))):
            port_value = name_field(draw, 1) + name_field(draw, 2)
            if draw(st.integers(0, 19)):
                port_value += field(3, 2, draw(value_bodies()))
            parts.append(field(2, 2, port_value))
        raw = b"".join(parts)
    else:
        def chunk() -> bytes:
            body = b""
            sequence = draw(st.sampled_from([0, 1, 300, -1, 2**63]))
            if sequence:
                body += field(1, 0, sequence)
            body += name_field(draw, 2) + name_field(draw, 3)
            if draw(st.integers(0, 19)):
                body += field(4, 2, draw(value_bodies()))
            return body
        if kind == "stream":
            raw = field(2, 2, chunk())
        else:
            raw = field(5, 2, b"".join(field(1, 2, chunk())
                                       for _ in range(draw(st.integers(1, 3)))))
    if draw(st.booleans()):
        # Half the time the canonical encoding (what the generated serializer writes), which
        # the parser path accepts: hypothesis favours duplicated and empty fields otherwise.
        message_class = {"execute": pb.ExecuteRequest, "stream": pb.StreamRequest,
                         "results": pb.StreamResponse, "response": pb.ExecuteResponse}[kind]
        with contextlib.suppress(DecodeError):
            raw = message_class.FromString(raw).SerializeToString()
    mutation = draw(st.sampled_from(["none"] * 7 + ["truncate", "corrupt"]))
    if mutation == "truncate" and raw:
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif mutation == "corrupt" and raw:
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        raw = bytes(data)
    return raw


limits = st.sampled_from([Limits(), Limits(max_tensor_bytes=1), Limits(max_tensor_bytes=8),
                          Limits(max_tensor_bytes=16), Limits(max_tensor_bytes=4096)])


def _chunk_request(dims: list[int], dtype: int = pb.DTYPE_UINT8, data: bytes = b"x") -> bytes:
    tensor = field(1, 0, dtype) + field(2, 2, b"".join(varint(d) for d in dims)) + field(3, 2, data)
    return field(2, 2, field(2, 2, b"n") + field(4, 2, field(1, 2, tensor)))


def _execute_request(dims: list[int], dtype: int = pb.DTYPE_UINT8, data: bytes = b"x") -> bytes:
    tensor = field(1, 0, dtype) + field(2, 2, b"".join(varint(d) for d in dims)) + field(3, 2, data)
    return field(2, 2, field(1, 2, b"n") + field(3, 2, field(1, 2, tensor)))


@PROFILE
@given(raw=messages(), limit=limits)
# The issue's case: 100 dimensions through the fast chunk path.
@example(raw=_chunk_request([1] * 100), limit=Limits())
@example(raw=_chunk_request([1] * 33), limit=Limits())
@example(raw=_chunk_request([0, 2**62, 2**62], data=b""), limit=Limits())
@example(raw=_execute_request([1] * 100), limit=Limits())
# A named pipeline and its version (a negative one: ten varint bytes), on both paths.
@example(raw=field(3, 2, b"scaler") + field(4, 0, 3) + _execute_request([2], data=b"xy"),
         limit=Limits())
@example(raw=field(3, 2, b"p") + field(4, 0, -1), limit=Limits())
@example(raw=_execute_request([1] * 33), limit=Limits())
# An enum value beyond int32 (the generated parser keeps its low 32 bits).
@example(raw=_execute_request([1], dtype=2**32 + pb.DTYPE_UINT8), limit=Limits())
@example(raw=_chunk_request([1], dtype=2**32 + pb.DTYPE_UINT8), limit=Limits())
# Tensors over the limit: rank 1 (the parser path's shortcut) and rank 2.
@example(raw=_execute_request([3], dtype=pb.DTYPE_INT32, data=bytes(12)),
         limit=Limits(max_tensor_bytes=8))
@example(raw=_execute_request([1, 3], dtype=pb.DTYPE_INT32, data=bytes(12)),
         limit=Limits(max_tensor_bytes=8))
@example(raw=_chunk_request([3], dtype=pb.DTYPE_INT32, data=bytes(12)),
         limit=Limits(max_tensor_bytes=8))
# A packed shape whose last varint runs on past the field (into a harmless 0x00 byte).
@example(raw=field(2, 2, field(4, 2, field(1, 2, b"\x08\x06\x12\x01\x81\x00\x1a\x01x"))),
         limit=Limits())
@example(raw=field(2, 2, field(3, 2, field(1, 2, b"\x08\x06\x12\x01\x81\x00\x1a\x01x"))),
         limit=Limits())
# Non-canonical encodings the generated parser merges or overrides, the scan reads field by
# field: a oneof member replaced by a later one; one tensor in two halves; one value in two.
@example(raw=field(2, 2, field(3, 2, field(1, 2, field(1, 0, 15) + field(3, 2, b"x"))
                               + field(3, 2, b""))), limit=Limits())
@example(raw=field(2, 2, field(3, 2, field(1, 2, field(1, 0, pb.DTYPE_UINT8) + field(3, 2, b"x"))
                               + field(1, 2, field(2, 2, b"\x01")))), limit=Limits())
@example(raw=field(2, 2, field(3, 2, field(1, 2, field(1, 0, pb.DTYPE_UINT8)))
                   + field(3, 2, field(1, 2, field(2, 2, b"\x01") + field(3, 2, b"x")))),
         limit=Limits())
# ExecuteResponses as the server frames them: one output, and two (one 2-D) with node metrics.
@example(raw=_unary.encode_execute_response([PortItem("n", "p", np.arange(3, dtype="<f4"))],
                                            pb.ExecutionMetrics(total_ms=3.0)), limit=Limits())
@example(raw=_unary.encode_execute_response(
    [PortItem("a", "out", np.arange(6, dtype="<i8").reshape(2, 3)),
     PortItem("b", "", np.ones(2, dtype=bool))],
    pb.ExecutionMetrics(total_ms=1.0, plan_cached=True,
                        nodes=[pb.NodeMetrics(node_id="a", wall_ms=0.5)])), limit=Limits())
def test_fast_decoders_match_the_general_ones(raw: bytes, limit: Limits) -> None:
    assert_same_decoding(raw, limit)
    for layout in _unary.LAYOUTS._by_size.get(len(raw), ()):
        if layout.decode(raw) is not None:
            # The same layout with other data (every data byte inverted) and with one fixed
            # byte changed: still what the general path makes of them.
            other = bytearray(raw)
            for _, _, dtype, count, offset, _ in layout.tensors:
                for i in range(offset, offset + count * dtype.itemsize):
                    other[i] ^= 0xFF
            assert_same_decoding(bytes(other), limit)
            at, part = layout.fixed[-1]
            other[at + len(part) - 1] ^= 0x01
            assert_same_decoding(bytes(other), limit)
    if _unary.RESPONSE_LAYOUTS.decode(raw) is not None:
        layout = next(layout for layout in _unary.RESPONSE_LAYOUTS._by_size[len(raw)]
                      if _layouts._matches(raw, layout.fixed))
        # Other data and other metrics (their last byte), then one framing byte changed.
        other = bytearray(raw)
        for _, _, dtype, count, offset, _ in layout.tensors:
            for i in range(offset, offset + count * dtype.itemsize):
                other[i] ^= 0xFF
        other[-1] ^= 0x01
        assert_same_decoding(bytes(other), limit)
        at, _ = layout.fixed[0]
        other[at] ^= 0x01
        assert_same_decoding(bytes(other), limit)
    repeated = _streams.CHUNK_LAYOUTS.decode(raw, limit) or _streams.RESULT_LAYOUTS.decode(
        raw, _codec.DEFAULT_LIMITS)
    if repeated is not None:
        # Other data (the chunk's last bytes), and one byte before the data changed.
        data = bytearray(raw)
        nbytes = repeated[3].nbytes
        for i in range(len(raw) - nbytes, len(raw)):
            data[i] ^= 0xFF
        assert_same_decoding(bytes(data), limit)
        data[len(raw) - nbytes - 1] ^= 0x01
        assert_same_decoding(bytes(data), limit)


def test_the_issues_hundred_dimensions_is_a_violation_with_its_path() -> None:
    decoded = decode_stream_request(_chunk_request([1] * 100))
    assert [(v.field, v.kind) for v in decoded.violations] == [
        ("data.value.tensor.shape", "invalid")]
    decoded_unary = decode_execute_request(_execute_request([1] * 100))
    assert [v.field for v in decoded_unary.violations] == ["inputs[0].value.tensor.shape"]


def test_an_enum_beyond_int32_reads_as_the_generated_parser_reads_it() -> None:
    raw = _execute_request([1], dtype=2**32 + pb.DTYPE_UINT8)
    assert pb.ExecuteRequest.FromString(raw).inputs[0].value.tensor.dtype == pb.DTYPE_UINT8
    for decoded in (decode_execute_request(raw), decode_stream_request(_chunk_request(
            [1], dtype=2**32 + pb.DTYPE_UINT8))):
        assert decoded.violations == []


def test_the_fast_paths_are_taken() -> None:
    """The comparisons above are only worth something if the fast paths decode these."""
    array = np.arange(6, dtype="<f4").reshape(2, 3)
    raw = join(encode_port_value(2, "n", "p", array))
    assert _unary._decode_small_request(raw, Limits()) is not None
    request = join(encode_port_value(2, "n", "p", array) + encode_port_value(2, "m", "", array))
    for _ in range(2):  # seen, then learned
        decode_execute_request(request)
    assert _unary.LAYOUTS.decode(request, _codec.DEFAULT_LIMITS) is not None
    chunk = join(_streams.encode_stream_item(2, 5, "n", "p", array))
    assert _streams._fast_stream_chunk(chunk, 2, len(chunk), Limits(), []) is not None
    for sequence in (6, 7):  # seen, then learned
        decode_stream_request(join(_streams.encode_stream_item(2, sequence, "n", "p", array)))
    again = join(_streams.encode_stream_item(2, 300, "n", "p", array))
    assert _streams.CHUNK_LAYOUTS.decode(again, _codec.DEFAULT_LIMITS) is not None
    for sequence in (6, 7):
        decode_stream_response(encode_stream_results([StreamItem(sequence, "n", "p", array)]))
    result = encode_stream_results([StreamItem(300, "n", "p", array)])
    assert _streams.RESULT_LAYOUTS.decode(result, _codec.DEFAULT_LIMITS) is not None
    metrics = pb.ExecutionMetrics(total_ms=1.5, nodes=[pb.NodeMetrics(node_id="n")])
    for _ in range(2):
        decode_execute_response(_unary.encode_execute_response([PortItem("n", "p", array)],
                                                               metrics))
    response = _unary.encode_execute_response([PortItem("n", "p", array * 2)],
                                              pb.ExecutionMetrics(total_ms=2.5))
    assert _unary.RESPONSE_LAYOUTS.decode(response) is None  # other metrics size
    metrics.total_ms = 7.0
    response = _unary.encode_execute_response([PortItem("n", "p", array * 2)], metrics)
    assert _unary.RESPONSE_LAYOUTS.decode(response) is not None


# --- encoders: the fast framing against the general one and the generated serializer ----------

arrays = st.sampled_from(SENDABLE).flatmap(lambda dt: hnp.arrays(
    dt, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4)))


@st.composite
def deep_arrays(draw: st.DrawFn) -> np.ndarray:
    """Arrays of rank up to 32 (numpy's limit is 64), mostly of side 1."""
    rank = draw(st.integers(0, 32))
    dims = [1] * rank
    for i in draw(st.lists(st.integers(0, max(rank - 1, 0)), max_size=3)):
        if rank:
            dims[i] = draw(st.integers(0, 3))
    return draw(hnp.arrays(draw(st.sampled_from(SENDABLE)), tuple(dims)))


@PROFILE
@given(array=arrays | deep_arrays(), node=names, port=names)
def test_fast_encoders_match_the_generated_serializer(array: np.ndarray, node: str,
                                                      port: str) -> None:
    little = array.astype(array.dtype.newbyteorder("<")) if array.dtype.byteorder == ">" \
        else array
    expected_tensor = pb.Tensor(dtype=wire_dtype(array.dtype), shape=list(array.shape),
                                data=np.ascontiguousarray(little).tobytes()).SerializeToString()
    tensor, size = _codec._encode_tensor(array)
    assert join(tensor) == expected_tensor and size == len(expected_tensor)
    expected = pb.ExecuteResponse(outputs=[pb.PortValue(
        node_id=node, port=port, value=pb.Value(tensor=pb.Tensor.FromString(expected_tensor)))]
    ).SerializeToString()
    general = join(encode_port_value(1, node, port, array))
    assert general == expected
    # Twice: the first call frames it and keeps the head, the second reuses the head.
    for _ in range(2):
        fast = _unary._tensor_output(PortItem(node, port, array))
        assert fast is not None and join(fast) == general
    # ExecuteRequest (the client's side): the manifest's fields and the input's head are kept
    # on the first call and reused on the next ones, with other data of the same layout too.
    other = np.ascontiguousarray(np.flip(array)) if array.ndim else array.copy()
    for value in (array, other, array):
        wire = value.astype(value.dtype.newbyteorder("<")) if value.dtype.byteorder == ">" \
            else value
        expected_request = pb.ExecuteRequest(manifest_json='{"nodes": []}', inputs=[
            pb.PortValue(node_id=node, port=port, value=pb.Value(tensor=pb.Tensor(
                dtype=wire_dtype(value.dtype), shape=list(value.shape),
                data=np.ascontiguousarray(wire).tobytes())))]).SerializeToString()
        assert encode_execute_request('{"nodes": []}', [PortItem(node, port, value)]) == \
            expected_request
    # Stream results: the general framing of one and of several.
    # Twice each (framed, then from the kept middle), at sequences of 0, 1 and 2 varint bytes.
    for sequence in (3, 3, 0, 0, 300, 300):
        one = encode_stream_results([StreamItem(sequence, node, port, array)])
        assert one == pb.StreamResponse(result=pb.StreamResult(
            sequence=sequence, node_id=node, port=port,
            value=pb.Value(tensor=pb.Tensor.FromString(expected_tensor)))).SerializeToString()


# Byte sizes around the points where a length's varint grows (1 -> 2 -> 3 -> 4 bytes), which
# the drawn arrays above (a few KiB at most) rarely reach.
@pytest.mark.parametrize("nbytes", [0, 1, 112, 127, 128, 300, 16_370, 16_384, 70_000,
                                    2**21 + 5])
def test_output_framing_at_varint_boundaries(nbytes: int) -> None:
    for array in (np.arange(nbytes, dtype=np.uint8), np.ones((nbytes // 8, 1), dtype="<f8")):
        expected = pb.ExecuteResponse(outputs=[pb.PortValue(
            node_id="node", port="out", value=pb.Value(tensor=pb.Tensor(
                dtype=wire_dtype(array.dtype), shape=list(array.shape),
                data=array.tobytes())))]).SerializeToString()
        fast = _unary._tensor_output(PortItem("node", "out", array))
        assert fast is not None and join(fast) == expected
        assert join(encode_port_value(1, "node", "out", array)) == expected


def test_request_heads_are_kept_per_manifest_and_bounded() -> None:
    """The kept request heads follow the manifest, pipeline and version they were made for; a
    manifest past the size bound is encoded every time (and still right)."""
    array = np.arange(6, dtype=np.float32)
    large = '{"nodes": [], "metadata": {"notes": "' + "x" * (70 * 1024) + '"}}'
    for manifest, pipeline, version in [("{}", "", 0), ('{"a": 1}', "", 0), ("", "p", 0),
                                        ("", "p", 2), (large, "", 0), ("{}", "", 0)]:
        for _ in range(2):
            decoded = decode_execute_request(encode_execute_request(
                manifest, [PortItem("n", "in", array)], pipeline, version))
            assert decoded.violations == []
            assert (decoded.manifest_json, decoded.pipeline) == (manifest, pipeline)
            assert decoded.pipeline_version == version
            np.testing.assert_array_equal(decoded.inputs[0].value, array)
    assert all(len(key[0]) <= _unary._KEPT_MANIFEST_CHARS for key in _unary._REQUEST_HEADS)
    assert len(_unary._REQUEST_HEADS) <= _unary._KEPT_REQUEST_HEADS


class _Node:
    def __init__(self, node_id: str, wall_ms: float, fallback: str) -> None:
        self.node_id, self.node_type, self.runtime = node_id, "T", "inprocess"
        self.reason, self.wall_ms, self.fallback = "default", wall_ms, fallback
        self.inputs_consumed = self.outputs_produced = 0


@PROFILE
@given(total=st.floats(allow_nan=False), cached=st.booleans(),
       nodes=st.lists(st.tuples(names, st.floats(allow_nan=False), st.sampled_from(["", "x"])),
                      max_size=3))
def test_metrics_framing_matches_the_generated_serializer(
        total: float, cached: bool, nodes: list[tuple[str, float, str]]) -> None:
    figures = [_Node(*n) for n in nodes]
    raw = encode_execution_metrics(total, figures, cached)
    expected = pb.ExecutionMetrics(total_ms=total, plan_cached=cached, nodes=[
        pb.NodeMetrics(node_id=f.node_id, node_type=f.node_type, runtime=f.runtime,
                       selection_reason=f.reason, wall_ms=f.wall_ms, fallback=f.fallback)
        for f in figures])
    assert pb.ExecutionMetrics.FromString(raw) == expected
