"""ExecutePipeline's messages: ExecuteRequest and ExecuteResponse (with its metrics), on top of
the framing, tensors and values of ``_codec``: large ones scanned by hand without copying tensor
bytes, small ones through the generated parser where that costs less."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np

from tensorline.v1 import tensorline_pb2 as pb
from tensorline.wire._codec import (
    _F_METRICS_NODES,
    _F_REQUEST_INPUTS,
    _F_REQUEST_MANIFEST,
    _F_REQUEST_PIPELINE,
    _F_REQUEST_PIPELINE_VERSION,
    _F_RESPONSE_METRICS,
    _F_RESPONSE_OUTPUTS,
    _LEN,
    _T_METRICS_NODES,
    _T_METRICS_PLAN_CACHED,
    _T_METRICS_TOTAL_MS,
    _T_NODE_WALL_MS,
    _T_PORT_VALUE,
    _T_RESPONSE_OUTPUTS,
    _T_VALUE_TENSOR,
    _VARINT,
    BAD_CONTENT,
    DEFAULT_LIMITS,
    DecodedExecuteRequest,
    DecodedExecuteResponse,
    KeptHeads,
    Limits,
    MalformedMessage,
    Pieces,
    PortItem,
    Violation,
    _decode_port_value,
    _encode_tensor,
    _fields,
    _len_field,
    _tag,
    _tensor,
    _to_int64,
    _utf8,
    _varint_bytes,
    encode_port_value,
    join,
)
from tensorline.wire._layouts import RequestLayouts, ResponseLayouts

# --- ExecuteRequest / ExecuteResponse ------------------------------------------------------------


def encode_execute_request(manifest_json: str, inputs: list[PortItem], pipeline: str = "",
                           pipeline_version: int = 0) -> bytes:
    """``manifest_json``, or the name of a pipeline of the server's repository (and a version
    of it, 0 = the newest)."""
    return join(_request_pieces(manifest_json, inputs, pipeline, pipeline_version))


def _request_pieces(manifest_json: str, inputs: list[PortItem], pipeline: str,
                    pipeline_version: int) -> Pieces:
    """A client sends one pipeline call after call: the fields before the inputs are made once
    per (manifest, pipeline, version), and each plain array input's bytes up to its data once
    per (node, port, dtype, shape), as for responses and stream chunks."""
    key = (manifest_json, pipeline, pipeline_version)
    head = _REQUEST_HEADS.get(key)
    if head is None:
        head = pb.ExecuteRequest(manifest_json=manifest_json, pipeline=pipeline,
                                 pipeline_version=pipeline_version).SerializeToString()
        if len(manifest_json) <= _KEPT_MANIFEST_CHARS:
            if len(_REQUEST_HEADS) >= _KEPT_REQUEST_HEADS:
                _REQUEST_HEADS.clear()
            _REQUEST_HEADS[key] = head
    pieces: Pieces = [head]
    for item in inputs:
        kept = _INPUT_HEADS.pieces(item.node_id, item.port, item.value)
        if kept is None:
            kept = encode_port_value(_F_REQUEST_INPUTS, item.node_id, item.port, item.value)
            _INPUT_HEADS.keep(item.node_id, item.port, item.value, kept)
        pieces += kept
    return pieces


# An ExecuteRequest's fields before its inputs, for recent (manifest, pipeline, version) keys;
# bounded in number and in size (a large manifest costs its copy whatever is kept).
_REQUEST_HEADS: dict[tuple[str, str, int], bytes] = {}
_KEPT_REQUEST_HEADS = 64
_KEPT_MANIFEST_CHARS = 64 * 1024
# An input entry's bytes up to its tensor's data.
_INPUT_HEADS = KeptHeads()


def _pieces_of(request: DecodedExecuteRequest) -> Pieces:
    return _request_pieces(request.manifest_json, request.inputs, request.pipeline,
                           request.pipeline_version)


# Below this size the C parser (upb) plus one small copy per tensor costs fewer Python-level
# steps than walking the wire format by hand; above it, the zero-copy scan wins.
SMALL_MESSAGE_BYTES = 64 * 1024


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
    # A tensor the general path must report on (it says exactly where): a scratch list.
    problems: list[Violation] = []
    for item in message.inputs:
        value = item.value
        if value.metadata:
            return None
        kind = value.WhichOneof("kind")
        decoded: Any
        if kind == "tensor":
            tensor = value.tensor
            data = tensor.data
            # The parser's shape container as is: a list() of it costs more than the rest.
            decoded = _tensor(data, tensor.dtype, tensor.shape, 0, len(data), "", limits,
                              problems)
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


# The layouts of recent requests (``_layouts``): a request that repeats one is not parsed.
LAYOUTS = RequestLayouts()


def decode_execute_request(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> DecodedExecuteRequest:
    request = LAYOUTS.decode(raw, limits)
    if request is None:
        request = _decode_request(raw, limits)
        LAYOUTS.learn(raw, request, limits, _pieces_of)
    return request


def _decode_request(raw: bytes, limits: Limits) -> DecodedExecuteRequest:
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


# Sizes of the tags _tensor_output frames with.
_TENSOR_TAG = len(_T_VALUE_TENSOR)
_VALUE_TAG = len(_T_PORT_VALUE)


def _tensor_output(item: PortItem) -> Pieces | None:
    """One ``ExecuteResponse.outputs`` entry for a plain array: the tensor's pieces from the
    codec's encoder, framed flat with the (node, port) head made once per pair, without the
    nested framing of ``encode_port_value``; everything before the data is kept
    (``_OUTPUT_HEADS``). None for anything else (the general framing)."""
    value = item.value
    if type(value) is not np.ndarray:
        return None
    kept = _OUTPUT_HEADS.pieces(item.node_id, item.port, value)
    if kept is not None:
        return kept
    tensor, tensor_len = _encode_tensor(value)
    tensor_len_bytes = _varint_bytes(tensor_len)
    value_len = _TENSOR_TAG + len(tensor_len_bytes) + tensor_len
    value_len_bytes = _varint_bytes(value_len)
    head = _port_head(item.node_id, item.port)
    port_len = len(head) + _VALUE_TAG + len(value_len_bytes) + value_len
    pieces: Pieces = [_T_RESPONSE_OUTPUTS, _varint_bytes(port_len), head, _T_PORT_VALUE,
                      value_len_bytes, _T_VALUE_TENSOR, tensor_len_bytes, *tensor]
    _OUTPUT_HEADS.keep(item.node_id, item.port, value, pieces)
    return pieces


# An output entry's bytes up to its tensor's data.
_OUTPUT_HEADS = KeptHeads()


class NodeFigures(Protocol):
    """What the response reports per node (the server's NodeReport has these attributes)."""

    node_id: str
    node_type: str
    runtime: str
    reason: str
    wall_ms: float
    fallback: str
    inputs_consumed: int
    outputs_produced: int


def node_metrics(node: NodeFigures) -> pb.NodeMetrics:
    """The ``NodeMetrics`` entry of one node: the one mapping from a node's figures to the
    message (unary responses frame it by hand from it, streams send it as is)."""
    return pb.NodeMetrics(node_id=node.node_id, node_type=node.node_type, runtime=node.runtime,
                          selection_reason=node.reason, wall_ms=node.wall_ms,
                          fallback=node.fallback, inputs_consumed=node.inputs_consumed,
                          outputs_produced=node.outputs_produced)


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
        head = node_metrics(node)
        # The identifying part only: wall_ms follows by hand, and the rest is at its default
        # (not serialized) whenever the prefix is used.
        head.ClearField("wall_ms")
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
        if node.fallback or node.inputs_consumed or node.outputs_produced:  # rare: in full
            pieces += _len_field(_F_METRICS_NODES, [node_metrics(node).SerializeToString()])
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
        framed = _tensor_output(item)
        if framed is not None:
            pieces += framed
        else:
            pieces += encode_port_value(_F_RESPONSE_OUTPUTS, item.node_id, item.port, item.value)
    if not isinstance(metrics, bytes):
        metrics = metrics.SerializeToString()
    pieces += _len_field(_F_RESPONSE_METRICS, [metrics])
    return join(pieces)


# The layouts of recent responses (the client's side): a response that repeats one is parsed
# for its metrics only.
RESPONSE_LAYOUTS = ResponseLayouts(_tag(_F_RESPONSE_METRICS, _LEN)[0])


def decode_execute_response(raw: bytes) -> DecodedExecuteResponse:
    repeated = RESPONSE_LAYOUTS.decode(raw)
    if repeated is not None:
        outputs, metrics_at = repeated
        return DecodedExecuteResponse(outputs, pb.ExecutionMetrics.FromString(raw[metrics_at:]))
    response = _decode_response(raw)
    RESPONSE_LAYOUTS.learn(raw, response.outputs, lambda: _output_pieces(response.outputs))
    return response


def _output_pieces(outputs: list[PortItem]) -> Pieces:
    pieces: Pieces = []
    for item in outputs:
        framed = _tensor_output(item)
        if framed is None:
            return []
        pieces += framed
    return pieces


def _decode_response(raw: bytes) -> DecodedExecuteResponse:
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
