"""Wire codec: tensorline v1 messages <-> Python values, with as few copies of tensor bytes as possible.

Both ends of the protocol use this module, so they agree on every detail of the encoding.

Why not just the generated classes? Every access of a protobuf ``bytes`` field copies it, setting
it copies, ``SerializeToString`` copies nested bytes twice and parsing copies again; for a 64 MiB
tensor that is several copies into freshly mapped memory at ~27 ms each. So the messages that
carry bulk data (``PortValue`` and everything inside it) are framed and scanned here by hand:

* decoding walks the protobuf wire format of the received ``bytes`` and returns arrays made with
  ``np.frombuffer`` *over the received buffer itself* (zero copies, read-only);
* encoding produces a list of pieces whose tensor pieces are memoryviews of the arrays, joined
  once into the ``bytes`` that gRPC requires (one copy).

Small, data-free messages (metrics, catalogue, server info) use the generated classes.

Decoding never raises on bad content: problems are collected as ``Violation`` records with the
field path, so the server can report every problem of a request at once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from tensorline.v1 import tensorline_pb2 as pb
from tensorline.wire._json import JsonRejected, loads
from tensorline.wire._values import Audio, Json, Tagged

# --- dtype table ---------------------------------------------------------------------------------

_DTYPE_TO_WIRE: dict[np.dtype[Any], int] = {
    np.dtype(np.bool_): pb.DTYPE_BOOL,
    np.dtype("<i1"): pb.DTYPE_INT8,
    np.dtype("<i2"): pb.DTYPE_INT16,
    np.dtype("<i4"): pb.DTYPE_INT32,
    np.dtype("<i8"): pb.DTYPE_INT64,
    np.dtype("<u1"): pb.DTYPE_UINT8,
    np.dtype("<u2"): pb.DTYPE_UINT16,
    np.dtype("<u4"): pb.DTYPE_UINT32,
    np.dtype("<u8"): pb.DTYPE_UINT64,
    np.dtype("<f2"): pb.DTYPE_FLOAT16,
    np.dtype("<f4"): pb.DTYPE_FLOAT32,
    np.dtype("<f8"): pb.DTYPE_FLOAT64,
    np.dtype("<c8"): pb.DTYPE_COMPLEX64,
    np.dtype("<c16"): pb.DTYPE_COMPLEX128,
}
_WIRE_TO_DTYPE: dict[int, np.dtype[Any]] = {v: k for k, v in _DTYPE_TO_WIRE.items()}

SUPPORTED_DTYPES: tuple[str, ...] = tuple(str(d) for d in _DTYPE_TO_WIRE)


def wire_dtype(dtype: np.dtype[Any]) -> int:
    """The wire enum of a numpy dtype (any byte order); ValueError if it has none."""
    little = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
    try:
        return _DTYPE_TO_WIRE[little]
    except KeyError:
        raise ValueError(
            f"dtype {dtype} cannot travel on the wire; supported: {', '.join(SUPPORTED_DTYPES)}"
        ) from None


# Every dtype ``wire_dtype`` accepts (both byte orders), for a quick membership test.
SENDABLE_DTYPES: frozenset[np.dtype[Any]] = frozenset(
    {d for d in _DTYPE_TO_WIRE} | {d.newbyteorder(">") for d in _DTYPE_TO_WIRE})


def numpy_dtype(wire: int) -> np.dtype[Any]:
    return _WIRE_TO_DTYPE[wire]


# --- errors and decoded forms --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Violation:
    """One problem in a request: a field path and what is wrong with it."""

    field: str
    description: str
    # "invalid" -> INVALID_ARGUMENT; "limit" -> RESOURCE_EXHAUSTED; "precondition" ->
    # FAILED_PRECONDITION (the server cannot run it as configured, e.g. a sandbox layer the
    # policy requires for untrusted code is missing).
    kind: str = "invalid"


class MalformedMessage(ValueError):
    """The bytes are not a valid protobuf encoding of the expected message."""


# What decoding bad bytes can raise (UnicodeDecodeError is a ValueError; DecodeError comes from
# the generated parsers of small messages; IndexError and OverflowError from the hand-written
# scans). Decoders turn these into violations: nothing a peer sends escapes as an exception.
BAD_CONTENT = (MalformedMessage, DecodeError, ValueError, IndexError, OverflowError)


@dataclass(slots=True)
class PortItem:
    """A value addressed to or produced by one port of one node ("" = the default port)."""

    node_id: str
    port: str
    value: Any


@dataclass(slots=True)
class DecodedExecuteRequest:
    manifest_json: str = ""
    inputs: list[PortItem] = field(default_factory=list)
    # A named pipeline of the server's repository instead of a manifest (0 = newest version).
    pipeline: str = ""
    pipeline_version: int = 0
    violations: list[Violation] = field(default_factory=list)
    # Total bytes of the raw request, for logging and metrics.
    size: int = 0


@dataclass(slots=True)
class DecodedExecuteResponse:
    outputs: list[PortItem] = field(default_factory=list)
    metrics: pb.ExecutionMetrics = field(default_factory=pb.ExecutionMetrics)


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits the decoder enforces (0 = unlimited)."""

    max_tensor_bytes: int = 0
    # Nesting of a JSON value: deeper documents are refused before parsing.
    max_json_depth: int = 0


# The limits a decoder applies when its caller names none (immutable: safe as a default).
DEFAULT_LIMITS = Limits()


# --- low-level wire helpers ----------------------------------------------------------------------

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        try:
            byte = buf[pos]
        except IndexError:
            raise MalformedMessage("truncated varint") from None
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise MalformedMessage("varint longer than 10 bytes")


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (field number, wire type, a, b): for varints a is the value; for LEN a:b is the span."""
    while pos < end:
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise MalformedMessage("field number 0")
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos)
            yield number, wire_type, value, 0
        elif wire_type == _LEN:
            length, pos = _read_varint(buf, pos)
            start, pos = pos, pos + length
            if pos > end:
                raise MalformedMessage("length-delimited field runs past the end of its message")
            yield number, wire_type, start, pos
        elif wire_type == _I64:
            pos += 8
        elif wire_type == _I32:
            pos += 4
        else:
            raise MalformedMessage(f"unsupported wire type {wire_type}")
    if pos != end:
        raise MalformedMessage("field runs past the end of its message")


# Varints below 2**14 (tags, lengths of small messages, dtypes, dimensions) come precomputed.
_SMALL_VARINTS: tuple[bytes, ...] = tuple(
    bytes((v,)) if v < 0x80 else bytes(((v & 0x7F) | 0x80, v >> 7)) for v in range(1 << 14))


def _varint_bytes(value: int) -> bytes:
    if 0 <= value < 16384:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint_bytes((number << 3) | wire_type)


# --- field numbers and tags, from the generated descriptors -------------------------------------
#
# Every field number the hand-written framing and scanning use, read once at import time from
# the descriptors of the generated module (so the codec cannot drift from the .proto), and the
# tags built from them. tests/wire/test_descriptor.py checks each against the descriptor's field
# type (which fixes the wire type). Hot paths use these constants, never lookups per call.


def _number(message: Any, name: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[name].number)


_F_TENSOR_DTYPE = _number(pb.Tensor, "dtype")
_F_TENSOR_SHAPE = _number(pb.Tensor, "shape")
_F_TENSOR_DATA = _number(pb.Tensor, "data")
_F_AUDIO_SAMPLES = _number(pb.Audio, "samples")
_F_AUDIO_SAMPLE_RATE = _number(pb.Audio, "sample_rate")
_F_VALUE_TENSOR = _number(pb.Value, "tensor")
_F_VALUE_AUDIO = _number(pb.Value, "audio")
_F_VALUE_TEXT = _number(pb.Value, "text")
_F_VALUE_JSON = _number(pb.Value, "json")
_F_VALUE_BINARY = _number(pb.Value, "binary")
_F_VALUE_METADATA = _number(pb.Value, "metadata")
_F_PORT_NODE_ID = _number(pb.PortValue, "node_id")
_F_PORT_PORT = _number(pb.PortValue, "port")
_F_PORT_VALUE = _number(pb.PortValue, "value")
_F_REQUEST_MANIFEST = _number(pb.ExecuteRequest, "manifest_json")
_F_REQUEST_INPUTS = _number(pb.ExecuteRequest, "inputs")
_F_REQUEST_PIPELINE = _number(pb.ExecuteRequest, "pipeline")
_F_REQUEST_PIPELINE_VERSION = _number(pb.ExecuteRequest, "pipeline_version")
_F_RESPONSE_OUTPUTS = _number(pb.ExecuteResponse, "outputs")
_F_RESPONSE_METRICS = _number(pb.ExecuteResponse, "metrics")
_F_METRICS_TOTAL_MS = _number(pb.ExecutionMetrics, "total_ms")
_F_METRICS_NODES = _number(pb.ExecutionMetrics, "nodes")
_F_METRICS_PLAN_CACHED = _number(pb.ExecutionMetrics, "plan_cached")
_F_NODE_WALL_MS = _number(pb.NodeMetrics, "wall_ms")
# StreamChunk (client -> server) and StreamResult (server -> client) share one framing.
_F_CHUNK_SEQUENCE = _number(pb.StreamChunk, "sequence")
_F_CHUNK_NODE_ID = _number(pb.StreamChunk, "node_id")
_F_CHUNK_PORT = _number(pb.StreamChunk, "port")
_F_CHUNK_VALUE = _number(pb.StreamChunk, "value")
for _name in ("sequence", "node_id", "port", "value"):
    if _number(pb.StreamResult, _name) != _number(pb.StreamChunk, _name):
        raise ImportError(f"StreamResult.{_name} and StreamChunk.{_name} differ in number")
_F_SREQ_INIT = _number(pb.StreamRequest, "init")
_F_SREQ_DATA = _number(pb.StreamRequest, "data")
_F_SREQ_CLOSE = _number(pb.StreamRequest, "close")
_F_SREQ_CANCEL = _number(pb.StreamRequest, "cancel")
_F_SRESP_READY = _number(pb.StreamResponse, "ready")
_F_SRESP_RESULT = _number(pb.StreamResponse, "result")
_F_SRESP_EVENT = _number(pb.StreamResponse, "event")
_F_SRESP_CLOSED = _number(pb.StreamResponse, "closed")
_F_SRESP_RESULTS = _number(pb.StreamResponse, "results")
_F_SRESP_ERROR = _number(pb.StreamResponse, "error")
_F_RESULTS_RESULTS = _number(pb.StreamResults, "results")


def _key(number: int, wire_type: int) -> int:
    """A tag as the single byte the inline scanners compare against (numbers 1..15)."""
    tag = (number << 3) | wire_type
    if tag >= 0x80:
        raise ImportError(f"field {number} needs a multi-byte tag; the inline scanners read one")
    return tag


# Tags as bytes (framing) and, for the inline scanners, as the int of their single byte.
_T_TENSOR_DTYPE = _tag(_F_TENSOR_DTYPE, _VARINT)
_T_TENSOR_SHAPE = _tag(_F_TENSOR_SHAPE, _LEN)  # packed repeated int64
_T_TENSOR_DATA = _tag(_F_TENSOR_DATA, _LEN)
_T_AUDIO_SAMPLE_RATE = _tag(_F_AUDIO_SAMPLE_RATE, _VARINT)
_T_VALUE_TENSOR = _tag(_F_VALUE_TENSOR, _LEN)
_T_PORT_VALUE = _tag(_F_PORT_VALUE, _LEN)
_T_RESPONSE_OUTPUTS = _tag(_F_RESPONSE_OUTPUTS, _LEN)
_T_METRICS_TOTAL_MS = _tag(_F_METRICS_TOTAL_MS, _I64)
_T_METRICS_NODES = _tag(_F_METRICS_NODES, _LEN)
_T_METRICS_PLAN_CACHED = _tag(_F_METRICS_PLAN_CACHED, _VARINT)
_T_NODE_WALL_MS = _tag(_F_NODE_WALL_MS, _I64)
_T_CHUNK_SEQUENCE = _tag(_F_CHUNK_SEQUENCE, _VARINT)
_T_CHUNK_NODE_ID = _tag(_F_CHUNK_NODE_ID, _LEN)
_T_CHUNK_PORT = _tag(_F_CHUNK_PORT, _LEN)
_K_TENSOR_DTYPE = _key(_F_TENSOR_DTYPE, _VARINT)
_K_TENSOR_SHAPE = _key(_F_TENSOR_SHAPE, _LEN)
_K_TENSOR_SHAPE_UNPACKED = _key(_F_TENSOR_SHAPE, _VARINT)  # a parser must accept it too
_K_TENSOR_DATA = _key(_F_TENSOR_DATA, _LEN)
_K_VALUE_TENSOR = _key(_F_VALUE_TENSOR, _LEN)
_K_CHUNK_SEQUENCE = _key(_F_CHUNK_SEQUENCE, _VARINT)
_K_CHUNK_NODE_ID = _key(_F_CHUNK_NODE_ID, _LEN)
_K_CHUNK_PORT = _key(_F_CHUNK_PORT, _LEN)
_K_CHUNK_VALUE = _key(_F_CHUNK_VALUE, _LEN)


def _to_int64(value: int) -> int:
    return value - (1 << 64) if value >= (1 << 63) else value


def _to_int32(value: int) -> int:
    """An int32 (or enum) field as protobuf parsers read it: the low 32 bits, signed."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= (1 << 31) else value


def _utf8(buf: bytes, start: int, end: int) -> str:
    return buf[start:end].decode("utf-8")


# Pieces are joined once into the final bytes; tensor pieces are memoryviews of the arrays.
Pieces = list[bytes | memoryview]


def _length(pieces: Pieces) -> int:
    # memoryview pieces are byte-format (cast to "B"), so len() is their size in bytes.
    return sum(map(len, pieces))


_LEN_TAGS: dict[int, bytes] = {}


def _len_field(number: int, pieces: Pieces) -> Pieces:
    tag = _LEN_TAGS.get(number)
    if tag is None:
        tag = _LEN_TAGS[number] = _tag(number, _LEN)
    return [tag, _varint_bytes(_length(pieces)), *pieces]


def _string_field(tag: bytes, text: str) -> Pieces:
    if not text:
        return []
    data = text.encode("utf-8")
    return [tag, _varint_bytes(len(data)), data]


# --- tensors -------------------------------------------------------------------------------------


def as_wire_array(array: npt.ArrayLike) -> npt.NDArray[Any]:
    """Normalize an array for the wire: little-endian, C-contiguous, supported dtype."""
    arr = np.asarray(array)
    wire_dtype(arr.dtype)  # raise early with the list of supported dtypes
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    # Not np.ascontiguousarray: it turns a 0-d array into shape (1,).
    return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)


# Sizes of the tensor's tags (the dtype's with its one-byte enum), for the encoded length.
_DTYPE_HEAD = len(_T_TENSOR_DTYPE) + 1
_SHAPE_TAG = len(_T_TENSOR_SHAPE)
_DATA_TAG = len(_T_TENSOR_DATA)


def _encode_tensor(array: npt.ArrayLike) -> tuple[Pieces, int]:
    """The one tensor encoder: a ``Tensor`` body as pieces (the data a memoryview of the
    array, not copied) and its length in bytes (what the framing around it needs). Framed by
    hand (dtype, packed shape, data): building a pb.Tensor for the header costs more than the
    rest of a small chunk's encoding. Fields at their default are omitted, as protobuf does."""
    arr = array if type(array) is np.ndarray and array.flags.c_contiguous else None
    wire = _DTYPE_TO_WIRE.get(arr.dtype) if arr is not None else None  # type: ignore[union-attr]
    if arr is None or wire is None:
        arr = as_wire_array(array)
        wire = wire_dtype(arr.dtype)
    shape = arr.shape
    if not shape:
        pieces: Pieces = [_T_TENSOR_DTYPE, _SMALL_VARINTS[wire]]
        size = _DTYPE_HEAD
    else:
        dims = _varint_bytes(shape[0]) if len(shape) == 1 else b"".join(
            [_varint_bytes(d) for d in shape])
        dims_len = _varint_bytes(len(dims))
        pieces = [_T_TENSOR_DTYPE, _SMALL_VARINTS[wire], _T_TENSOR_SHAPE, dims_len, dims]
        size = _DTYPE_HEAD + _SHAPE_TAG + len(dims_len) + len(dims)
    nbytes = arr.nbytes
    if nbytes:
        data_len = _varint_bytes(nbytes)
        pieces += [_T_TENSOR_DATA, data_len, _data_view(arr)]
        size += _DATA_TAG + len(data_len) + nbytes
    return pieces, size


def _data_view(arr: Any) -> memoryview:
    """A C-contiguous array's data as a byte-format memoryview (not copied): the data piece
    of every tensor encoding."""
    return memoryview(arr if arr.ndim == 1 else arr.reshape(-1)).cast("B")


class KeptHeads:
    """An encoding's bytes up to a plain array's data, made once per (node, port, dtype,
    shape) and then reused as one piece: a pipeline sends arrays of one dtype and shape from
    one port call after call (or chunk after chunk). Bounded: names come from manifests."""

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._heads: dict[tuple[str, str, np.dtype[Any], tuple[int, ...]], bytes] = {}

    def pieces(self, node_id: str, port: str, value: Any) -> Pieces | None:
        """[head, data] for a value whose head is kept; None otherwise (encode it, then
        ``keep``)."""
        if type(value) is not np.ndarray or not value.flags.c_contiguous:
            return None
        head = self._heads.get((node_id, port, value.dtype, value.shape))
        return None if head is None else [head, _data_view(value)]

    def keep(self, node_id: str, port: str, value: Any, pieces: Pieces) -> None:
        """Keep all of ``pieces`` but the last as ``value``'s head, when the last is its data:
        only arrays sent as they are (contiguous, a wire dtype in native order, not empty);
        others were converted first."""
        if (type(value) is not np.ndarray or not value.flags.c_contiguous
                or value.dtype not in _DTYPE_TO_WIRE or type(pieces[-1]) is not memoryview):
            return
        if len(self._heads) >= self._capacity:
            self._heads.clear()
        self._heads[(node_id, port, value.dtype, value.shape)] = b"".join(
            pieces[:-1])  # type: ignore[arg-type]


# A tag byte at or above this starts a multi-byte tag (or a non-minimal one).
_MULTI_BYTE = 0x80
_INT64_SIGN = 1 << 63


def _skip_field(buf: bytes, pos: int, key: int, end: int) -> int:
    """The position after the value of a field the scanner does not read (tag ``key`` already
    read up to ``pos``), for any wire type, as ``_fields`` walks it."""
    if key >> 3 == 0:
        raise MalformedMessage("field number 0")
    wire_type = key & 7
    if wire_type == _VARINT:
        return _read_varint(buf, pos)[1]
    if wire_type == _LEN:
        length, pos = _read_varint(buf, pos)
        pos += length
        if pos > end:
            raise MalformedMessage("length-delimited field runs past the end of its message")
        return pos
    if wire_type == _I64:
        return pos + 8
    if wire_type == _I32:
        return pos + 4
    raise MalformedMessage(f"unsupported wire type {wire_type}")


def _decode_tensor(
    buf: bytes, start: int, end: int, path: str, limits: Limits, out: list[Violation]
) -> npt.NDArray[Any] | None:
    """The one decoder of a ``Tensor`` body at buf[start:end] (every decoding path uses it):
    a read-only array over ``buf`` itself (no copy), or None with the problem appended to
    ``out`` under ``path``. Bytes that are no protobuf encoding raise ``MalformedMessage``,
    which the message decoders report. Scanned inline by tag (it runs for every tensor
    received), skipping unknown fields and reading an unpacked shape as protobuf parsers do."""
    dtype_wire = 0
    shape: list[int] = []
    data_start = data_end = start
    pos = start
    while pos < end:
        key = buf[pos]
        if key < _MULTI_BYTE:
            pos += 1
        else:
            key, pos = _read_varint(buf, pos)
        if key == _K_TENSOR_DATA:
            length, pos = _read_varint(buf, pos)
            data_start = pos
            pos = data_end = pos + length
            if pos > end:
                raise MalformedMessage("length-delimited field runs past the end of its message")
        elif key == _K_TENSOR_SHAPE:  # packed (what protobuf writes)
            length, pos = _read_varint(buf, pos)
            dims_end = pos + length
            if dims_end > end:
                raise MalformedMessage("length-delimited field runs past the end of its message")
            while pos < dims_end:
                dim, pos = _read_varint(buf, pos)
                shape.append(dim)
            if pos != dims_end:
                raise MalformedMessage("packed shape ends inside a varint")
        elif key == _K_TENSOR_DTYPE:
            dtype_wire, pos = _read_varint(buf, pos)
        elif key == _K_TENSOR_SHAPE_UNPACKED:
            dim, pos = _read_varint(buf, pos)
            shape.append(dim)
        else:
            pos = _skip_field(buf, pos, key, end)
    if pos != end:
        raise MalformedMessage("field runs past the end of its message")
    return _tensor(buf, dtype_wire, shape, data_start, data_end, path, limits, out)


def _tensor(buf: bytes, dtype_wire: int, shape: Sequence[int], data_start: int, data_end: int,
            path: str, limits: Limits, out: list[Violation]) -> npt.NDArray[Any] | None:
    """A tensor's fields (the dtype enum and dimensions as read, signed or not) and its data at
    buf[data_start:data_end] -> the array over ``buf``, or None with the problem in ``out``.
    ``_decode_tensor`` gives it what it scanned; the small-request path of ``_unary`` what the
    generated parser read."""
    dtype = _WIRE_TO_DTYPE.get(dtype_wire)
    if dtype is None:
        dtype_wire = _to_int32(dtype_wire)  # an enum: int32 on the wire
        dtype = _WIRE_TO_DTYPE.get(dtype_wire)
        if dtype is None:
            out.append(Violation(f"{path}.dtype", f"unknown or unspecified dtype {dtype_wire}"))
            return None
    if len(shape) == 1:  # the commonest shape, in fewer steps
        count = shape[0]
        negative = count < 0 or count >= _INT64_SIGN
    else:
        count = math.prod(shape)
        negative = any(d < 0 or d >= _INT64_SIGN for d in shape)
    if negative:  # as read (signed, from the generated parser) or as scanned (unsigned)
        shape = [_to_int64(d) for d in shape]
        out.append(Violation(f"{path}.shape", f"negative dimension in shape {shape}"))
        return None
    expected = count * dtype.itemsize
    actual = data_end - data_start
    if limits.max_tensor_bytes and max(expected, actual) > limits.max_tensor_bytes:
        out.append(
            Violation(
                f"{path}.data",
                f"tensor of {max(expected, actual)} bytes exceeds the server limit of "
                f"{limits.max_tensor_bytes} bytes",
                kind="limit",
            )
        )
        return None
    if actual != expected:
        out.append(
            Violation(
                f"{path}.data",
                f"{actual} bytes but shape {shape} of {dtype} needs "
                f"{count} x {dtype.itemsize} = {expected} bytes",
            )
        )
        return None
    try:
        # Positional: numpy parses keyword arguments here at several times the cost.
        array = np.frombuffer(buf, dtype, count, data_start)
        return array if len(shape) == 1 else array.reshape(shape)
    except ValueError as exc:  # more dimensions than numpy supports, or an absurd zero-size shape
        out.append(Violation(f"{path}.shape", f"unsupported shape {shape}: {exc}"))
        return None


# --- values --------------------------------------------------------------------------------------


def encode_value(value: Any) -> Pieces:
    """Pieces of a ``Value`` message body (without its own tag and length)."""
    metadata: dict[str, str] = {}
    if isinstance(value, Tagged):
        metadata = value.metadata
        value = value.value
    pieces: Pieces
    if isinstance(value, np.ndarray | np.generic):
        tensor, size = _encode_tensor(value)
        pieces = [_T_VALUE_TENSOR, _varint_bytes(size), *tensor]
    elif isinstance(value, Audio):
        rate = int(value.sample_rate)
        if not 0 < rate < 2**31:  # an int32 on the wire, and never zero or negative
            raise ValueError(f"audio sample_rate must be in 1..{2**31 - 1}, got {rate}")
        audio = [*_len_field(_F_AUDIO_SAMPLES, _encode_tensor(value.samples)[0]),
                 _T_AUDIO_SAMPLE_RATE, _varint_bytes(rate)]
        pieces = _len_field(_F_VALUE_AUDIO, audio)
    elif isinstance(value, str):
        pieces = [pb.Value(text=value).SerializeToString()]
    elif isinstance(value, Json):
        text = json.dumps(value.value, separators=(",", ":"), allow_nan=False)
        pieces = [pb.Value(json=text).SerializeToString()]
    elif isinstance(value, bytes | bytearray | memoryview):
        pieces = [pb.Value(binary=bytes(value)).SerializeToString()]
    else:
        raise TypeError(
            f"cannot send a value of type {type(value).__name__}; use a numpy array, "
            "tensorline.client.Audio, str, tensorline.client.Json or bytes"
        )
    if metadata:
        pieces.append(pb.Value(metadata=metadata).SerializeToString())
    return pieces


def _decode_value(
    buf: bytes, start: int, end: int, path: str, limits: Limits, out: list[Violation]
) -> Any:
    value: Any = None
    kind = ""
    metadata: dict[str, str] = {}
    for number, wire_type, a, b in _fields(buf, start, end):
        if wire_type != _LEN:
            continue
        if number == _F_VALUE_TENSOR:
            kind, value = "tensor", _decode_tensor(buf, a, b, f"{path}.tensor", limits, out)
        elif number == _F_VALUE_AUDIO:
            kind, value = "audio", _decode_audio(buf, a, b, f"{path}.audio", limits, out)
        elif number == _F_VALUE_TEXT:
            kind, value = "text", _decode_text(buf, a, b, f"{path}.text", out)
        elif number == _F_VALUE_JSON:
            kind, value = "json", _decode_json(buf, a, b, f"{path}.json", limits, out)
        elif number == _F_VALUE_BINARY:
            kind, value = "binary", buf[a:b]
        elif number == _F_VALUE_METADATA:
            try:
                entry = pb.Value.MetadataEntry.FromString(buf[a:b])
            except DecodeError as exc:
                out.append(Violation(f"{path}.metadata", f"malformed metadata entry: {exc}"))
                continue
            metadata[entry.key] = entry.value
    if not kind:
        out.append(Violation(path, "value has no content (set one of tensor/audio/text/json/binary)"))
        return None
    if value is None:
        return None
    return Tagged(value, metadata) if metadata else value


def _decode_audio(
    buf: bytes, start: int, end: int, path: str, limits: Limits, out: list[Violation]
) -> Audio | None:
    samples = None
    sample_rate = 0
    seen_samples = False
    for number, wire_type, a, b in _fields(buf, start, end):
        if number == _F_AUDIO_SAMPLES and wire_type == _LEN:
            seen_samples = True
            samples = _decode_tensor(buf, a, b, f"{path}.samples", limits, out)
        elif number == _F_AUDIO_SAMPLE_RATE and wire_type == _VARINT:
            sample_rate = _to_int64(a)
    if not seen_samples:
        out.append(Violation(f"{path}.samples", "audio has no samples"))
        return None
    if sample_rate <= 0:
        out.append(Violation(f"{path}.sample_rate", f"must be positive, got {sample_rate}"))
        return None
    if samples is None:
        return None
    if samples.ndim not in (1, 2):
        out.append(
            Violation(f"{path}.samples.shape",
                      f"audio must be (frames,) or (frames, channels), got {list(samples.shape)}")
        )
        return None
    return Audio(samples, sample_rate)


def _decode_text(buf: bytes, start: int, end: int, path: str, out: list[Violation]) -> str | None:
    try:
        return _utf8(buf, start, end)
    except UnicodeDecodeError as exc:
        out.append(Violation(path, f"not valid UTF-8: {exc.reason} at byte {exc.start}"))
        return None


def _decode_json(buf: bytes, start: int, end: int, path: str, limits: Limits,
                 out: list[Violation]) -> Json | None:
    text = _decode_text(buf, start, end, path, out)
    if text is None:
        return None
    try:
        return Json(loads(text, max_depth=limits.max_json_depth))
    except JsonRejected as exc:
        out.append(Violation(path, exc.reason, kind="limit" if exc.limit else "invalid"))
        return None


# --- port values ---------------------------------------------------------------------------------


def encode_port_value(number: int, node_id: str, port: str, value: Any) -> Pieces:
    """A ``PortValue`` as field ``number`` of its parent message."""
    head = pb.PortValue(node_id=node_id, port=port).SerializeToString()
    return _len_field(number, [head, *_len_field(_F_PORT_VALUE, encode_value(value))])


def _decode_port_value(
    buf: bytes, start: int, end: int, path: str, limits: Limits, out: list[Violation]
) -> PortItem:
    node_id = port = ""
    value: Any = None
    has_value = False
    for number, wire_type, a, b in _fields(buf, start, end):
        if wire_type != _LEN:
            continue
        if number == _F_PORT_NODE_ID:
            node_id = _utf8(buf, a, b)
        elif number == _F_PORT_PORT:
            port = _utf8(buf, a, b)
        elif number == _F_PORT_VALUE:
            has_value = True
            value = _decode_value(buf, a, b, f"{path}.value", limits, out)
    if not has_value:
        out.append(Violation(f"{path}.value", "missing value"))
    return PortItem(node_id, port, value)


def join(pieces: Pieces) -> bytes:
    return b"".join(pieces)
