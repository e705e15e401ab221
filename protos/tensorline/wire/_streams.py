"""StreamPipeline's messages: StreamRequest (init, chunk, close, cancel) and StreamResponse, on
top of the framing, tensors and values of ``_codec``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tensorline.v1 import tensorline_pb2 as pb
from tensorline.wire._codec import (
    _F_CHUNK_NODE_ID,
    _F_CHUNK_PORT,
    _F_CHUNK_SEQUENCE,
    _F_CHUNK_VALUE,
    _F_RESULTS_RESULTS,
    _F_SREQ_CANCEL,
    _F_SREQ_CLOSE,
    _F_SREQ_DATA,
    _F_SREQ_INIT,
    _F_SRESP_CLOSED,
    _F_SRESP_ERROR,
    _F_SRESP_EVENT,
    _F_SRESP_READY,
    _F_SRESP_RESULT,
    _F_SRESP_RESULTS,
    _K_CHUNK_NODE_ID,
    _K_CHUNK_PORT,
    _K_CHUNK_SEQUENCE,
    _K_CHUNK_VALUE,
    _K_VALUE_TENSOR,
    _LEN,
    _T_CHUNK_NODE_ID,
    _T_CHUNK_PORT,
    _T_CHUNK_SEQUENCE,
    _VARINT,
    BAD_CONTENT,
    DEFAULT_LIMITS,
    KeptHeads,
    Limits,
    MalformedMessage,
    Pieces,
    PortItem,
    Violation,
    _decode_tensor,
    _decode_value,
    _fields,
    _len_field,
    _read_varint,
    _string_field,
    _tag,
    _to_int64,
    _utf8,
    _varint_bytes,
    encode_value,
    join,
)
from tensorline.wire._layouts import ChunkLayouts

# --- streaming messages --------------------------------------------------------------------------


@dataclass(slots=True)
class DecodedStreamChunk:
    sequence: int
    item: PortItem


def _len_at(raw: bytes, pos: int) -> tuple[int, int]:
    length = raw[pos]
    if length < 0x80:
        return length, pos + 1
    return _read_varint(raw, pos)


# The length-delimited fields of a chunk, as the single bytes of their tags.
_CHUNK_LEN_KEYS = (_K_CHUNK_NODE_ID, _K_CHUNK_PORT, _K_CHUNK_VALUE)


def _fast_stream_chunk(raw: bytes, start: int, end: int, limits: Limits,
                       out: list[Violation]) -> DecodedStreamChunk | None:
    """The common case, a chunk whose value is one tensor, scanned inline (a third of the
    general walk's time for small chunks); the tensor goes through the codec's one tensor
    decoder, as on the general path (so its problems land in ``out`` with the same path). None
    when anything else is unusual: the general decoder then handles (and reports) it."""
    sequence = 0
    node_id = port = ""
    value_start = -1
    pos = start
    while pos < end:
        key = raw[pos]
        pos += 1
        if key == _K_CHUNK_SEQUENCE:
            sequence, pos = _read_varint(raw, pos)
            continue
        if key not in _CHUNK_LEN_KEYS:
            return None
        length, pos = _len_at(raw, pos)
        field_start, pos = pos, pos + length
        if pos > end:
            return None
        if key == _K_CHUNK_NODE_ID:
            node_id = raw[field_start:pos].decode("utf-8")
        elif key == _K_CHUNK_PORT:
            port = raw[field_start:pos].decode("utf-8")
        else:
            value_start = field_start
    if value_start < 0 or pos != end or raw[value_start] != _K_VALUE_TENSOR:
        return None
    length, tensor_start = _len_at(raw, value_start + 1)
    if tensor_start + length != end:  # the value holds more than its tensor (metadata...)
        return None
    value = _decode_tensor(raw, tensor_start, end, _CHUNK_TENSOR_PATH, limits, out)
    return DecodedStreamChunk(_to_int64(sequence), PortItem(node_id, port, value))


# Where a chunk's tensor is, in violations (the general path's ``_decode_value`` path + .tensor).
_CHUNK_VALUE_PATH = "data.value"
_CHUNK_TENSOR_PATH = f"{_CHUNK_VALUE_PATH}.tensor"


def decode_stream_chunk(
    raw: bytes, start: int, end: int, limits: Limits, out: list[Violation]
) -> DecodedStreamChunk:
    """Decode a ``StreamChunk`` body found at raw[start:end]."""
    try:
        fast = _fast_stream_chunk(raw, start, end, limits, out)
    except (IndexError, ValueError):
        # Bad bytes (MalformedMessage, UnicodeDecodeError): the general walk reports them
        # (nothing was added to ``out`` before the raise).
        fast = None
    if fast is not None:
        return fast
    sequence = 0
    node_id = port = ""
    value: Any = None
    has_value = False
    for number, wire_type, a, b in _fields(raw, start, end):
        if number == _F_CHUNK_SEQUENCE and wire_type == _VARINT:
            sequence = _to_int64(a)
        elif wire_type != _LEN:
            continue
        elif number == _F_CHUNK_NODE_ID:
            node_id = _utf8(raw, a, b)
        elif number == _F_CHUNK_PORT:
            port = _utf8(raw, a, b)
        elif number == _F_CHUNK_VALUE:
            has_value = True
            value = _decode_value(raw, a, b, _CHUNK_VALUE_PATH, limits, out)
    if not has_value:
        out.append(Violation(_CHUNK_VALUE_PATH, "missing value"))
    return DecodedStreamChunk(sequence, PortItem(node_id, port, value))


def encode_stream_item(number: int, sequence: int, node_id: str, port: str, value: Any) -> Pieces:
    """A StreamChunk/StreamResult body (they share field numbers) as field ``number``; for a
    plain array, everything between the sequence number and the data is kept
    (``_ITEM_MIDDLES``)."""
    head: Pieces = []
    if sequence:
        head += [_T_CHUNK_SEQUENCE, _varint_bytes(sequence & ((1 << 64) - 1))]
    rest = _ITEM_MIDDLES.pieces(node_id, port, value)
    if rest is None:
        rest = _item_rest(node_id, port, value)
        _ITEM_MIDDLES.keep(node_id, port, value, rest)
    return _len_field(number, [*head, *rest])


def _item_rest(node_id: str, port: str, value: Any) -> Pieces:
    """A chunk's body after its sequence number: node id, port, value."""
    return [*_string_field(_T_CHUNK_NODE_ID, node_id), *_string_field(_T_CHUNK_PORT, port),
            *_len_field(_F_CHUNK_VALUE, encode_value(value))]


# A chunk's bytes between its sequence number and its data.
_ITEM_MIDDLES = KeptHeads()


def scan_top_level(raw: bytes) -> Iterator[tuple[int, int, int, int]]:
    """The top-level fields of a message: (number, wire type, a, b) as in ``_fields``."""
    return _fields(raw, 0, len(raw))


# StreamRequest / StreamResponse -------------------------------------------------------------------
#
# Data chunks and results carry tensors, so they are framed and scanned by hand like PortValue:
# a received chunk's arrays are views over the received message (no copy) and a result's arrays
# go out as memoryviews joined once. Control messages (init, close, cancel, ready, event, closed)
# are small and use the generated classes.


@dataclass(slots=True)
class DecodedStreamRequest:
    """One client message of a stream: ``kind`` is init, data, close, cancel or "" (invalid)."""

    kind: str = ""
    init: pb.StreamInit | None = None
    chunk: DecodedStreamChunk | None = None
    cancel_reason: str = ""
    violations: list[Violation] = field(default_factory=list)
    size: int = 0


# The layouts of recent data chunks (``_layouts``): a chunk that repeats one is not scanned.
CHUNK_LAYOUTS = ChunkLayouts(_tag(_F_SREQ_DATA, _LEN)[0], _K_CHUNK_SEQUENCE)


def decode_stream_request(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> DecodedStreamRequest:
    """Decode a ``StreamRequest``; never raises (problems become ``violations``)."""
    repeated = CHUNK_LAYOUTS.decode(raw, limits)
    if repeated is not None:
        sequence, node_id, port, array = repeated
        return DecodedStreamRequest(
            "data", None, DecodedStreamChunk(_to_int64(sequence), PortItem(node_id, port, array)),
            "", [], len(raw))
    request = _decode_stream_request(raw, limits)
    chunk = request.chunk
    if chunk is not None and not request.violations:
        item = chunk.item
        CHUNK_LAYOUTS.learn(raw, item.node_id, item.port, item.value, limits,
                            lambda: _item_rest(item.node_id, item.port, item.value))
    return request


def _decode_stream_request(raw: bytes, limits: Limits) -> DecodedStreamRequest:
    request = DecodedStreamRequest(size=len(raw))
    try:
        for number, wire_type, a, b in scan_top_level(raw):
            if wire_type != _LEN:
                continue
            if number == _F_SREQ_INIT:
                request.kind, request.init = "init", pb.StreamInit.FromString(raw[a:b])
            elif number == _F_SREQ_DATA:
                request.kind = "data"
                request.chunk = decode_stream_chunk(raw, a, b, limits, request.violations)
            elif number == _F_SREQ_CLOSE:
                request.kind = "close"
            elif number == _F_SREQ_CANCEL:
                request.kind = "cancel"
                request.cancel_reason = pb.StreamCancel.FromString(raw[a:b]).reason
    except BAD_CONTENT as exc:
        request.violations.append(Violation("request", f"malformed StreamRequest: {exc}"))
    if not request.kind and not request.violations:
        request.violations.append(Violation("request", "empty StreamRequest (set init, data, "
                                                       "close or cancel)"))
    return request


def encode_stream_init(manifest_json: str, queue_size: int = 0, pipeline: str = "",
                       pipeline_version: int = 0) -> bytes:
    """The init message: ``manifest_json``, or a pipeline of the server's repository by name
    (and version, 0 = the newest)."""
    return pb.StreamRequest(init=pb.StreamInit(
        manifest_json=manifest_json, queue_size=queue_size, pipeline=pipeline,
        pipeline_version=pipeline_version)).SerializeToString()


def encode_stream_chunk(sequence: int, node_id: str, port: str, value: Any) -> bytes:
    return join(encode_stream_item(_F_SREQ_DATA, sequence, node_id, port, value))


def encode_stream_close() -> bytes:
    return pb.StreamRequest(close=pb.StreamClose()).SerializeToString()


def encode_stream_cancel(reason: str = "") -> bytes:
    return pb.StreamRequest(cancel=pb.StreamCancel(reason=reason)).SerializeToString()


@dataclass(slots=True)
class StreamItem:
    """A result of a stream: ``value`` produced by ``node_id``/``port`` from input ``sequence``
    (-1 when it was produced at end of stream, e.g. a flush)."""

    sequence: int
    node_id: str
    port: str
    value: Any


def encode_stream_results(items: list[StreamItem]) -> bytes:
    """One ``StreamResponse`` carrying ``items``: a single result, or a ``StreamResults`` batch."""
    if len(items) == 1:
        item = items[0]
        return join(encode_stream_item(_F_SRESP_RESULT, item.sequence, item.node_id, item.port, item.value))
    pieces: Pieces = []
    for item in items:
        pieces += encode_stream_item(_F_RESULTS_RESULTS, item.sequence, item.node_id, item.port, item.value)
    return join(_len_field(_F_SRESP_RESULTS, pieces))


@dataclass(slots=True)
class DecodedStreamResponse:
    """One server message of a stream: ``kind`` is ready, results, event or closed."""

    kind: str = ""
    results: list[StreamItem] = field(default_factory=list)
    ready: pb.StreamReady | None = None
    event: pb.StreamEvent | None = None
    closed: pb.StreamClosed | None = None
    # kind "error": the serialized google.rpc.Status the call is about to end with.
    error_status: bytes = b""


def _decode_stream_result(raw: bytes, start: int, end: int, problems: list[Violation]) -> StreamItem:
    chunk = decode_stream_chunk(raw, start, end, Limits(), problems)
    return StreamItem(chunk.sequence, chunk.item.node_id, chunk.item.port, chunk.item.value)


# The same for single results the server sends (decoded by the client).
RESULT_LAYOUTS = ChunkLayouts(_tag(_F_SRESP_RESULT, _LEN)[0], _K_CHUNK_SEQUENCE)


def decode_stream_response(raw: bytes) -> DecodedStreamResponse:
    repeated = RESULT_LAYOUTS.decode(raw, DEFAULT_LIMITS)
    if repeated is not None:
        sequence, node_id, port, array = repeated
        return DecodedStreamResponse("results", [StreamItem(_to_int64(sequence), node_id, port,
                                                            array)])
    response = _decode_stream_response(raw)
    if len(response.results) == 1:
        item = response.results[0]
        RESULT_LAYOUTS.learn(raw, item.node_id, item.port, item.value, DEFAULT_LIMITS,
                             lambda: _item_rest(item.node_id, item.port, item.value))
    return response


def _decode_stream_response(raw: bytes) -> DecodedStreamResponse:
    response = DecodedStreamResponse()
    problems: list[Violation] = []
    for number, wire_type, a, b in scan_top_level(raw):
        if wire_type != _LEN:
            continue
        if number == _F_SRESP_READY:
            response.kind, response.ready = "ready", pb.StreamReady.FromString(raw[a:b])
        elif number == _F_SRESP_RESULT:
            response.kind = "results"
            response.results.append(_decode_stream_result(raw, a, b, problems))
        elif number == _F_SRESP_EVENT:
            response.kind, response.event = "event", pb.StreamEvent.FromString(raw[a:b])
        elif number == _F_SRESP_CLOSED:
            response.kind, response.closed = "closed", pb.StreamClosed.FromString(raw[a:b])
        elif number == _F_SRESP_ERROR:
            response.kind = "error"
            response.error_status = pb.StreamError.FromString(raw[a:b]).status
        elif number == _F_SRESP_RESULTS:
            response.kind = "results"
            for inner, inner_type, c, d in _fields(raw, a, b):
                if inner == _F_RESULTS_RESULTS and inner_type == _LEN:
                    response.results.append(_decode_stream_result(raw, c, d, problems))
    if problems:
        raise MalformedMessage("; ".join(f"{p.field}: {p.description}" for p in problems))
    return response
