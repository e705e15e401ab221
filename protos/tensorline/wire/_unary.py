"""ExecutePipeline's messages: ExecuteRequest and ExecuteResponse (with its metrics), on top of
the framing, tensors and values of ``_codec``: large ones scanned by hand without copying tensor
bytes, small ones through the generated parser where that costs less."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from tensorline.v1 import tensorline_pb2 as pb
from tensorline.wire._codec import (
    _DTYPE_TO_WIRE,
    _F_METRICS_NODES,
    _F_REQUEST_INPUTS,
    _F_REQUEST_MANIFEST,
    _F_REQUEST_PIPELINE,
    _F_REQUEST_PIPELINE_VERSION,
    _F_RESPONSE_METRICS,
    _F_RESPONSE_OUTPUTS,
    _LEN,
    _SMALL_VARINTS,
    _T_METRICS_NODES,
    _T_METRICS_PLAN_CACHED,
    _T_METRICS_TOTAL_MS,
    _T_NODE_WALL_MS,
    _T_PORT_VALUE,
    _T_RESPONSE_OUTPUTS,
    _T_TENSOR_DATA,
    _T_TENSOR_DTYPE,
    _T_TENSOR_SHAPE,
    _T_VALUE_TENSOR,
    _VARINT,
    _WIRE_TO_DTYPE,
    BAD_CONTENT,
    DEFAULT_LIMITS,
    DecodedExecuteRequest,
    DecodedExecuteResponse,
    Limits,
    MalformedMessage,
    Pieces,
    PortItem,
    Violation,
    _decode_port_value,
    _fields,
    _len_field,
    _to_int64,
    _utf8,
    _varint_bytes,
    encode_port_value,
    join,
)

# --- ExecuteRequest / ExecuteResponse ------------------------------------------------------------


def encode_execute_request(manifest_json: str, inputs: list[PortItem], pipeline: str = "",
                           pipeline_version: int = 0) -> bytes:
    """``manifest_json``, or the name of a pipeline of the server's repository (and a version
    of it, 0 = the newest)."""
    pieces: Pieces = [pb.ExecuteRequest(manifest_json=manifest_json, pipeline=pipeline,
                                        pipeline_version=pipeline_version).SerializeToString()]
    for item in inputs:
        pieces += encode_port_value(_F_REQUEST_INPUTS, item.node_id, item.port, item.value)
    return join(pieces)


# Below this size the C parser (upb) plus one small copy per tensor costs fewer Python-level
# steps than walking the wire format by hand; above it, the zero-copy scan wins.
SMALL_MESSAGE_BYTES = 64 * 1024


def _plain_tensor(tensor: pb.Tensor, limits: Limits) -> npt.NDArray[Any] | None:
    """The array of a well-formed tensor, or None to let the scanning decoder report why not."""
    dtype = _WIRE_TO_DTYPE.get(tensor.dtype)
    if dtype is None:
        return None
    data = tensor.data
    if len(tensor.shape) == 1:  # the commonest shape, in fewer steps
        count = tensor.shape[0]
        if count < 0 or len(data) != count * dtype.itemsize or (
                limits.max_tensor_bytes and len(data) > limits.max_tensor_bytes):
            return None
        return np.frombuffer(data, dtype=dtype)
    shape = list(tensor.shape)
    if len(shape) > 32 or any(d < 0 for d in shape):
        return None
    if len(data) != math.prod(shape) * dtype.itemsize or (
            limits.max_tensor_bytes and len(data) > limits.max_tensor_bytes):
        return None
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError:  # e.g. a zero-size shape too large for numpy
        return None


def _decode_small_request(raw: bytes, limits: Limits) -> DecodedExecuteRequest | None:
    """Fast path for small, well-formed requests of tensors, text and bytes. None whenever
    anything needs the scanning decoder (audio, JSON, metadata, any problem to report)."""
    try:
        message = pb.ExecuteRequest.FromString(raw)
    except Exception:  # DecodeError: the scanning decoder says exactly what is wrong
        return None
    if message.ByteSize() != len(raw):
        # Not the canonical encoding: the parser may have merged repeated submessages (two
        # tensors of one value, two values of one input) or let a later oneof member replace an
        # earlier one, where the scanning decoder reads each field on its own and reports it.
        # A merge always shrinks the message, so equal sizes mean nothing was merged.
        return None
    request = DecodedExecuteRequest(manifest_json=message.manifest_json,
                                    pipeline=message.pipeline,
                                    pipeline_version=message.pipeline_version, size=len(raw))
    for item in message.inputs:
        value = item.value
        if value.metadata:
            return None
        kind = value.WhichOneof("kind")
        decoded: Any
        if kind == "tensor":
            decoded = _plain_tensor(value.tensor, limits)
            if decoded is None:
                return None
        elif kind == "text":
            decoded = value.text
        elif kind == "binary":
            decoded = value.binary
        else:
            return None
        request.inputs.append(PortItem(item.node_id, item.port, decoded))
    return request


def decode_execute_request(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> DecodedExecuteRequest:
    if len(raw) <= SMALL_MESSAGE_BYTES:
        fast = _decode_small_request(raw, limits)
        if fast is not None:
            return fast
    request = DecodedExecuteRequest(size=len(raw))
    try:
        for number, wire_type, a, b in _fields(raw, 0, len(raw)):
            if number == _F_REQUEST_PIPELINE_VERSION and wire_type == _VARINT:
                request.pipeline_version = _to_int64(a)
            elif wire_type != _LEN:
                continue
            elif number == _F_REQUEST_MANIFEST:
                request.manifest_json = _utf8(raw, a, b)
            elif number == _F_REQUEST_PIPELINE:
                request.pipeline = _utf8(raw, a, b)
            elif number == _F_REQUEST_INPUTS:
                path = f"inputs[{len(request.inputs)}]"
                request.inputs.append(
                    _decode_port_value(raw, a, b, path, limits, request.violations)
                )
    except BAD_CONTENT as exc:
        request.violations.append(Violation("request", f"malformed ExecuteRequest: {exc}"))
    return request


_PORT_HEADS: dict[tuple[str, str], bytes] = {}


def _port_head(node_id: str, port: str) -> bytes:
    """The ``node_id``/``port`` fields of a PortValue: the same few (node, port) pairs come back
    on every response, so their bytes are made once."""
    key = (node_id, port)
    head = _PORT_HEADS.get(key)
    if head is None:
        if len(_PORT_HEADS) >= 4096:  # bounded: names come from manifests
            _PORT_HEADS.clear()
        head = _PORT_HEADS[key] = pb.PortValue(node_id=node_id, port=port).SerializeToString()
    return head


# Sizes of the tags _small_tensor_output frames with (the dtype's: tag and a one-byte enum).
_DTYPE_HEAD = len(_T_TENSOR_DTYPE) + 1
_SHAPE_TAG = len(_T_TENSOR_SHAPE)
_DATA_TAG = len(_T_TENSOR_DATA)
_TENSOR_TAG = len(_T_VALUE_TENSOR)
_VALUE_TAG = len(_T_PORT_VALUE)


def _small_tensor_output(item: PortItem) -> bytes | None:
    """One ``ExecuteResponse.outputs`` entry for a small plain array, framed by hand in a single
    join (the array's bytes copied once); None for anything else (the general framing)."""
    arr = item.value
    if type(arr) is not np.ndarray or arr.nbytes > SMALL_MESSAGE_BYTES or not (
            arr.flags.c_contiguous):
        return None
    wire = _DTYPE_TO_WIRE.get(arr.dtype)
    if wire is None:
        return None
    shape = arr.shape
    dims = _varint_bytes(shape[0]) if len(shape) == 1 else b"".join(
        [_varint_bytes(d) for d in shape])
    nbytes = arr.nbytes
    # Tensor: dtype, packed shape (omitted for 0-d), data (omitted when empty, like the generated
    # code).
    shape_len = _varint_bytes(len(dims)) if shape else b""
    size_len = _varint_bytes(nbytes) if nbytes else b""
    tensor_len = _DTYPE_HEAD + (_SHAPE_TAG + len(shape_len) + len(dims) if shape else 0) + (
        _DATA_TAG + len(size_len) + nbytes if nbytes else 0)
    value_len = _TENSOR_TAG + len(_varint_bytes(tensor_len)) + tensor_len
    head = _port_head(item.node_id, item.port)
    port_len = len(head) + _VALUE_TAG + len(_varint_bytes(value_len)) + value_len
    pieces: Pieces = [_T_RESPONSE_OUTPUTS, _varint_bytes(port_len), head, _T_PORT_VALUE,
                      _varint_bytes(value_len), _T_VALUE_TENSOR, _varint_bytes(tensor_len),
                      _T_TENSOR_DTYPE, _SMALL_VARINTS[wire]]
    if shape:
        pieces += [_T_TENSOR_SHAPE, shape_len, dims]
    if nbytes:
        flat: Any = arr if arr.ndim == 1 else arr.reshape(-1)
        pieces += [_T_TENSOR_DATA, size_len, memoryview(flat).cast("B")]
    return b"".join(pieces)


class NodeFigures(Protocol):
    """What the response reports per node (the server's NodeReport has these attributes)."""

    node_id: str
    node_type: str
    runtime: str
    reason: str
    wall_ms: float
    fallback: str


_DOUBLE = struct.Struct("<d")
# Per (node, type, runtime, reason): a ``nodes`` entry of ExecutionMetrics up to wall_ms's value
# (its tag, its length, the identifying strings, wall_ms's tag).
_NODE_PREFIXES: dict[tuple[str, str, str, str], bytes] = {}


def _node_prefix(node: NodeFigures) -> bytes:
    key = (node.node_id, node.node_type, node.runtime, node.reason)
    prefix = _NODE_PREFIXES.get(key)
    if prefix is None:
        if len(_NODE_PREFIXES) >= 4096:  # bounded: names come from manifests
            _NODE_PREFIXES.clear()
        head = pb.NodeMetrics(node_id=node.node_id, node_type=node.node_type,
                              runtime=node.runtime, selection_reason=node.reason)
        body = head.SerializeToString()
        # wall_ms: 64-bit (its tag, then 8 bytes).
        prefix = _NODE_PREFIXES[key] = b"".join(
            [_T_METRICS_NODES, _varint_bytes(len(body) + len(_T_NODE_WALL_MS) + 8), body,
             _T_NODE_WALL_MS])
    return prefix


def encode_execution_metrics(total_ms: float, nodes: Iterable[NodeFigures],
                             plan_cached: bool) -> bytes:
    """An ``ExecutionMetrics`` message. Per node only the timing (and a fallback cause) changes
    between calls, so all the rest of a node's entry is made once per (node, runtime, reason)
    and the doubles are appended by hand (field order does not matter to protobuf parsers)."""
    pieces: Pieces = [_T_METRICS_TOTAL_MS, _DOUBLE.pack(total_ms)]
    for node in nodes:
        if node.fallback:  # rare: framed in full
            pieces += _len_field(_F_METRICS_NODES, [pb.NodeMetrics(
                node_id=node.node_id, node_type=node.node_type, runtime=node.runtime,
                selection_reason=node.reason, wall_ms=node.wall_ms,
                fallback=node.fallback).SerializeToString()])
        else:
            pieces += (_node_prefix(node), _DOUBLE.pack(node.wall_ms))
    if plan_cached:
        pieces += (_T_METRICS_PLAN_CACHED, b"\x01")  # bool true
    return b"".join(pieces)


def encode_execute_response(outputs: list[PortItem],
                            metrics: pb.ExecutionMetrics | bytes) -> bytes:
    """``metrics``: the message, or its bytes from ``encode_execution_metrics``."""
    pieces: Pieces = []
    for item in outputs:
        small = _small_tensor_output(item)
        if small is not None:
            pieces.append(small)
        else:
            pieces += encode_port_value(_F_RESPONSE_OUTPUTS, item.node_id, item.port, item.value)
    if not isinstance(metrics, bytes):
        metrics = metrics.SerializeToString()
    pieces += _len_field(_F_RESPONSE_METRICS, [metrics])
    return join(pieces)


def decode_execute_response(raw: bytes) -> DecodedExecuteResponse:
    response = DecodedExecuteResponse()
    problems: list[Violation] = []
    for number, wire_type, a, b in _fields(raw, 0, len(raw)):
        if wire_type != _LEN:
            continue
        if number == _F_RESPONSE_OUTPUTS:
            path = f"outputs[{len(response.outputs)}]"
            response.outputs.append(_decode_port_value(raw, a, b, path, Limits(), problems))
        elif number == _F_RESPONSE_METRICS:
            response.metrics = pb.ExecutionMetrics.FromString(raw[a:b])
    if problems:
        raise MalformedMessage("; ".join(f"{p.field}: {p.description}" for p in problems))
    return response
