"""Messages that repeat the layout of an earlier one, decoded without parsing them:
ExecuteRequests (``RequestLayouts``) and stream chunks (``ChunkLayouts``).

A client calling one pipeline sends, call after call, the same bytes but for its tensors' data:
the same manifest (or pipeline name), node ids, ports, dtypes and shapes, hence the same tags and
lengths at the same offsets. Once requests of one size have decoded cleanly twice, the layout of
the second is kept: the bytes around each tensor's data (the fixed parts) and where each tensor's
data lies. A later request of that size whose bytes equal the fixed parts (one ``startswith`` per
part, a memcmp in C) is that same message with other data: its arrays are made over the request
at the known offsets, with no field parsed or walked. In a running server this takes about
two thirds of a 1 KiB request's decoding CPU away (docs/performance.md, "Repeated layouts").

Why it is exact: two messages that agree on every byte outside some spans, whose lengths are
set by the bytes they agree on, parse to the same fields; tensor data are never interpreted,
so arrays over the new spans are what the general decoder would make of the new request. The
layout comes from re-encoding the decoded request with the codec's own encoder, and is kept
only when every re-encoded piece lies at the same offset of the received bytes and the lengths
add up: the canonical encoding tensorline's client and protobuf serializers write. Any other
encoding (fields reordered, unknown fields, metadata, values that are not tensors) simply never
gets a layout and keeps the general path.

Bounded, whatever peers send: layouts for at most ``MAX_SIZES`` sizes, ``PER_SIZE`` per size,
fixed parts of at most ``MAX_FIXED_BYTES`` per layout and ``MAX_TOTAL_BYTES`` in all (past
either count, everything is forgotten and learned again). A size is learned only when seen a
second time, so a client whose requests change size every call pays for no layout it will not
use; a client that alternates layouts of one size makes each of its requests pay a
re-encoding of its framing (no tensor data), about what decoding it costs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from tensorline.wire._codec import DecodedExecuteRequest, Limits, Pieces, PortItem, _read_varint

MAX_SIZES = 256
PER_SIZE = 4
MAX_FIXED_BYTES = 64 * 1024
MAX_TOTAL_BYTES = 4 * 1024 * 1024
# Request sizes decoded once by the general path, remembered up to this many.
MAX_SEEN = 4096


# Per tensor of a layout: node id, port, dtype, element count, data offset, shape (None: 1-d).
_TensorAt = tuple[str, str, np.dtype[Any], int, int, tuple[int, ...] | None]


def _arrays_at(raw: bytes, tensors: tuple[_TensorAt, ...]) -> list[PortItem]:
    frombuffer = np.frombuffer
    items = []
    for node_id, port, dtype, count, offset, shape in tensors:
        # Positional: numpy parses keyword arguments here at several times the cost.
        array = frombuffer(raw, dtype, count, offset)
        items.append(PortItem(node_id, port, array if shape is None else array.reshape(shape)))
    return items


def _matches(raw: bytes, fixed: tuple[tuple[int, bytes], ...]) -> bool:
    # A loop, not all() over a generator: this runs on every call, and is short.
    for offset, part in fixed:  # noqa: SIM110
        if not raw.startswith(part, offset):
            return False
    return True


def _split(pieces: Pieces, items: list[PortItem]
           ) -> tuple[list[tuple[int, bytes]], list[_TensorAt], int] | None:
    """A message re-encoded as ``pieces`` (each of ``items``' tensors' data one memoryview
    piece, in order) as its fixed parts, its tensors and its length; None when ``items`` are not
    all plain tensors with data."""
    arrays = [item.value for item in items]
    if not all(type(a) is np.ndarray and a.nbytes for a in arrays):
        return None  # text, bytes, audio, JSON, tagged or empty values: the general path
    fixed: list[tuple[int, bytes]] = []
    tensors: list[_TensorAt] = []
    offset = part_offset = index = 0
    part: list[bytes] = []
    for piece in pieces:
        if type(piece) is memoryview:  # a tensor's data, in order
            if part:
                fixed.append((part_offset, b"".join(part)))
                part = []
            if index == len(arrays):
                return None
            item, array = items[index], arrays[index]
            index += 1
            tensors.append((item.node_id, item.port, array.dtype, int(array.size), offset,
                            None if array.ndim == 1 else tuple(array.shape)))
            offset += piece.nbytes
            part_offset = offset
        else:
            part.append(bytes(piece))
            offset += len(piece)
    if part:
        fixed.append((part_offset, b"".join(part)))
    if index != len(arrays):
        return None
    return fixed, tensors, offset


class RequestLayout:
    """The bytes of a request outside its tensors' data, and where each tensor's data lies."""

    __slots__ = ("fixed", "kept", "limits", "manifest_json", "pipeline", "pipeline_version",
                 "tensors")

    def __init__(self, request: DecodedExecuteRequest, limits: Limits,
                 fixed: tuple[tuple[int, bytes], ...], tensors: tuple[_TensorAt, ...]) -> None:
        # The limits the learned request was checked against: every request of this layout has
        # the same tensor sizes, so it passes them too (under the same limits only).
        self.limits = limits
        # (offset, bytes) of every part outside the tensors' data, and their total size.
        self.fixed = fixed
        self.kept = sum(len(part) for _, part in fixed)
        self.tensors = tensors
        self.manifest_json = request.manifest_json
        self.pipeline = request.pipeline
        self.pipeline_version = request.pipeline_version

    def decode(self, raw: bytes) -> DecodedExecuteRequest | None:
        """``raw`` decoded, when its fixed parts are this layout's; otherwise None."""
        if not _matches(raw, self.fixed):
            return None
        return DecodedExecuteRequest(self.manifest_json, _arrays_at(raw, self.tensors),
                                     self.pipeline, self.pipeline_version, [], len(raw))


class _BySize:
    """Layouts by message size, within the module's bounds."""

    def __init__(self) -> None:
        self._by_size: dict[int, tuple[Any, ...]] = {}
        self._seen: set[int] = set()
        # Bytes of fixed parts kept.
        self._bytes = 0

    def _first_sighting(self, size: int) -> bool:
        """Whether ``size`` is seen for the first time (remembered: learned next time)."""
        if size in self._seen:
            return False
        if len(self._seen) >= MAX_SEEN:
            self._seen.clear()
        self._seen.add(size)
        return True

    def _keep(self, size: int, layout: Any) -> None:
        """Keep ``layout`` (``layout.kept``: bytes of its fixed parts) first among ``size``'s."""
        if ((size not in self._by_size and len(self._by_size) >= MAX_SIZES)
                or self._bytes + layout.kept > MAX_TOTAL_BYTES):
            self._by_size.clear()
            self._bytes = 0
        known = self._by_size.get(size, ())
        self._bytes += layout.kept - sum(old.kept for old in known[PER_SIZE - 1:])
        self._by_size[size] = (layout, *known[:PER_SIZE - 1])

    def clear(self) -> None:
        self._by_size.clear()
        self._seen.clear()
        self._bytes = 0

    def kept_bytes(self) -> int:
        """Bytes of fixed parts kept (what ``MAX_TOTAL_BYTES`` bounds)."""
        return self._bytes


class RequestLayouts(_BySize):
    """The layouts of ExecuteRequests learned so far, by request size."""

    def decode(self, raw: bytes, limits: Limits) -> DecodedExecuteRequest | None:
        """``raw`` decoded by a layout it repeats, or None (the general decoders' turn)."""
        layouts = self._by_size.get(len(raw))
        if layouts is None:
            return None
        for layout in layouts:
            if layout.limits is limits or layout.limits == limits:
                decoded = layout.decode(raw)
                if decoded is not None:
                    return decoded  # type: ignore[no-any-return]
        return None

    def learn(self, raw: bytes, request: DecodedExecuteRequest, limits: Limits,
              encode: Callable[[DecodedExecuteRequest], Pieces]) -> None:
        """Keep the layout of ``raw`` (decoded cleanly as ``request``; ``encode`` re-encodes it
        as pieces, each tensor's data one memoryview piece) when it qualifies."""
        if request.violations or not request.inputs or self._first_sighting(len(raw)):
            return
        split = _split(encode(request), request.inputs)
        if split is None:
            return
        fixed, tensors, length = split
        layout = RequestLayout(request, limits, tuple(fixed), tuple(tensors))
        if length != len(raw) or layout.kept > MAX_FIXED_BYTES or not _matches(raw, layout.fixed):
            return  # not the canonical encoding (or too large a manifest to keep)
        self._keep(len(raw), layout)


class ResponseLayout:
    """The bytes of an ExecuteResponse outside its outputs' data and its metrics (which end the
    message: their figures change with every call, their size does not), and where the
    outputs' data and the metrics lie."""

    __slots__ = ("fixed", "kept", "metrics_at", "tensors")

    def __init__(self, fixed: tuple[tuple[int, bytes], ...], tensors: tuple[_TensorAt, ...],
                 metrics_at: int) -> None:
        self.fixed = fixed
        self.kept = sum(len(part) for _, part in fixed)
        self.tensors = tensors
        self.metrics_at = metrics_at


class ResponseLayouts(_BySize):
    """The layouts of ExecuteResponses learned so far (the client's side of
    ``RequestLayouts``): the outputs as there, the metrics left to their parser."""

    def __init__(self, metrics_tag: int) -> None:
        super().__init__()
        self._metrics_tag = metrics_tag

    def decode(self, raw: bytes) -> tuple[list[PortItem], int] | None:
        """The outputs of a response of a known layout and where its metrics start, or None."""
        for layout in self._by_size.get(len(raw), ()):
            if _matches(raw, layout.fixed):
                return _arrays_at(raw, layout.tensors), layout.metrics_at
        return None

    def learn(self, raw: bytes, outputs: list[PortItem], encode: Callable[[], Pieces]) -> None:
        """Keep the layout of response ``raw`` (decoded cleanly to ``outputs``; ``encode``
        re-encodes the outputs alone) when its outputs are plain tensors in the canonical
        encoding, followed by the metrics field to the end."""
        if not outputs or self._first_sighting(len(raw)):
            return
        split = _split(encode(), outputs)
        if split is None:
            return
        fixed, tensors, at = split
        if at >= len(raw) or raw[at] != self._metrics_tag:
            return
        try:
            length, metrics_at = _read_varint(raw, at + 1)
        except (IndexError, ValueError):
            return
        if metrics_at + length != len(raw):
            return
        fixed.append((at, raw[at:metrics_at]))  # the metrics' tag and length
        layout = ResponseLayout(tuple(fixed), tuple(tensors), metrics_at)
        if layout.kept > MAX_FIXED_BYTES or not _matches(raw, layout.fixed):
            return
        self._keep(len(raw), layout)


class ChunkLayout:
    """A stream chunk's bytes after its sequence number (node id, port, the tensor's framing),
    and its tensor."""

    __slots__ = ("count", "dtype", "kept", "limits", "middle", "node_id", "port", "shape")

    def __init__(self, node_id: str, port: str, array: np.ndarray[Any, Any], middle: bytes,
                 limits: Limits) -> None:
        self.node_id = node_id
        self.port = port
        self.dtype = array.dtype
        self.count = int(array.size)
        self.shape = None if array.ndim == 1 else tuple(array.shape)
        self.middle = middle
        self.kept = len(middle)
        self.limits = limits


class ChunkLayouts(_BySize):
    """Stream chunks (a ``StreamChunk`` as field ``tag`` of the message, one tensor as its
    value) that repeat an earlier chunk but for their sequence number and data, as
    ``RequestLayouts`` does for whole requests. The sequence number changes with every chunk, so
    it is read (one varint); everything after it up to the data is compared. Bounded and
    learned as requests' layouts are (a size seen twice)."""

    def __init__(self, tag: int, sequence_key: int) -> None:
        # Sizes here: the length of what follows the sequence number.
        super().__init__()
        self._tag = tag
        self._sequence_key = sequence_key

    def _body(self, raw: bytes) -> tuple[int, int] | None:
        """(sequence as read, the offset after it) of a chunk message, or None."""
        if len(raw) < 2 or raw[0] != self._tag:
            return None
        length, pos = _read_varint(raw, 1)
        if pos + length != len(raw):
            return None  # more than the chunk (or less): the general path decides
        sequence = 0
        if pos < len(raw) and raw[pos] == self._sequence_key:
            sequence, pos = _read_varint(raw, pos + 1)
        return sequence, pos

    def decode(self, raw: bytes,
               limits: Limits) -> tuple[int, str, str, np.ndarray[Any, Any]] | None:
        """(sequence as read, node id, port, array) of a chunk of a known layout, or None."""
        try:
            body = self._body(raw)
        except (IndexError, ValueError):  # a varint cut short or too long
            return None
        if body is None:
            return None
        sequence, pos = body
        for layout in self._by_size.get(len(raw) - pos, ()):
            if ((layout.limits is limits or layout.limits == limits)
                    and raw.startswith(layout.middle, pos)):
                array = np.frombuffer(raw, layout.dtype, layout.count, pos + len(layout.middle))
                return (sequence, layout.node_id, layout.port,
                        array if layout.shape is None else array.reshape(layout.shape))
        return None

    def learn(self, raw: bytes, node_id: str, port: str, value: Any, limits: Limits,
              encode: Callable[[], Pieces]) -> None:
        """Keep the layout of chunk ``raw``, decoded cleanly to (``node_id``, ``port``,
        ``value``), when the value is one plain tensor; ``encode`` re-encodes the chunk's body
        without its sequence number, the tensor's data as the last piece."""
        if type(value) is not np.ndarray or not value.nbytes:
            return
        try:
            body = self._body(raw)
        except (IndexError, ValueError):
            return
        if body is None:
            return
        pos = body[1]
        rest = len(raw) - pos
        if self._first_sighting(rest):
            return
        pieces = encode()
        if type(pieces[-1]) is not memoryview or pieces[-1].nbytes != value.nbytes:
            return
        middle = b"".join(pieces[:-1])  # type: ignore[arg-type]
        if rest != len(middle) + value.nbytes or not raw.startswith(middle, pos):
            return  # not the canonical encoding
        if len(middle) > MAX_FIXED_BYTES:
            return
        self._keep(rest, ChunkLayout(node_id, port, value, middle, limits))
