"""Moving values between the server and a sandbox worker: pooled shared memory plus a framed
control channel.

Both sides import this module (the worker imports nothing gRPC), so they agree on the framing.

Why these choices (measured on 2-vCPU Linux machines of the CI kind; the hop's figures are in
docs/performance-runtimes.md, ``bench/bench_sandbox_hop.py`` measures them):

* Segments are anonymous ``memfd`` files passed over the control socket with ``SCM_RIGHTS``,
  never named ``/dev/shm`` entries. Nothing can outlive the processes that hold the fds (a
  server SIGKILL leaks nothing), no other process can open a segment by name (another execution
  cannot guess its way in), and the multiprocessing resource tracker is never involved (before Python 3.13 it
  unlinks a segment when a process that only attached to it exits: CPython gh-82300, fixed by
  the ``track`` parameter of 3.13).
* Each direction of each worker has one segment, reused across calls and grown (to the next
  power of two) when a message needs more: copying into already-touched memory runs ~7x faster
  than into fresh pages. Calls on one worker are serialized, so one segment per direction is
  enough; a grown segment's fd travels with the message that first uses it.
* Small arrays (``inline_max`` bytes or fewer) travel pickled inside the control message: a
  copy into the segment and a descriptor cost about as much as inlining them.
* The control channel is an ``AF_UNIX`` ``SOCK_SEQPACKET`` pair: message boundaries come from
  the kernel, fds attach to the message they belong to. A message body larger than
  ``MAX_MESSAGE`` is spilled into the segment, so there is no message size cap below the
  server's own tensor limit.
* What the worker sends is untrusted: the server decodes it with ``SafeUnpickler``, which only
  resolves the handful of globals that values are made of (never arbitrary callables), and
  those are functions that check what they are given (``_json_from_text``, ``_audio_from``,
  ``_tagged_from``, ``_inline_array``), never a class that a message could fill with anything
  (``numpy.ndarray`` would make an array of memory the server never wrote). Before that,
  ``refuse_sharing`` makes sure the pickle builds each object once: shared objects make a
  small message that expands exponentially for whatever walks it (hashing tuples while
  unpickling included). Honest senders pickle in fast mode (no memo), and a ``Json`` value
  crosses as its JSON text, so that expanding one costs its sender.
* The common message (a request or reply of small values: str, int, float, None, bytes and small
  C-contiguous numeric arrays in tuples, lists and dicts) is "direct": ``pack`` only checks its
  shape (no rebuilt copy) and pickles it as it is, flagged ``FLAG_DIRECT``, and ``unpack`` then
  has nothing to resolve against a segment (no decode walk). A direct message from the worker is
  read with ``DirectUnpickler``, which also refuses segment references, so a worker cannot smuggle
  one past the walk it skips. Small arrays are pickled as ``(dtype.str, shape, buffer)`` (rebuilt
  by ``_inline_array``, which refuses object dtypes; 1-D ones as ``numpy.frombuffer(buffer,
  dtype.str)``, which refuses them too and runs no Python code) rather than by numpy's reduce,
  which pickles a dtype object that costs more to rebuild than the 1 KiB of data it describes.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import io
import json
import mmap
import os
import pickle
import pickletools
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from tensorline.wire import Audio, Json, JsonRejected, Tagged, json_depth, loads

# Keep well below the default SO_SNDBUF (208 KiB): a SEQPACKET message must fit in it whole.
MAX_MESSAGE = 128 * 1024
DEFAULT_INLINE_MAX = 16 * 1024
# Arrays start on a cache-line boundary inside a segment.
ALIGN = 64
MIN_SEGMENT = 1 << 20

# Header: flags, size of a new segment whose fd rides along, spill offset, spill length.
_HEADER = struct.Struct("<BQQQ")
FLAG_NEW_SEGMENT = 1
FLAG_SPILLED = 2
# Nothing in the message refers to a segment (see the module docstring).
FLAG_DIRECT = 4
_DIRECT_HEADER = _HEADER.pack(FLAG_DIRECT, 0, 0, 0)
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_FD_ANCILLARY = socket.CMSG_SPACE(array.array("i", [0]).itemsize * 4)
# Plain ints: or-ing the socket module's IntFlag members runs enum code on every message.
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)


class ShmArray(NamedTuple):
    """An array placed in the segment of the message that carries this descriptor, or, with
    ``echo``, one the receiver itself sent and that comes back unchanged (a pass-through node
    returning its input, a reshape): no copy on the way back."""

    offset: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    fortran: bool
    echo: bool = False


class ShmBytes(NamedTuple):
    offset: int
    nbytes: int


class ProtocolError(Exception):
    """The peer sent something that is not a well-formed message (or a forbidden object)."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def _segment_size(needed: int) -> int:
    """Powers of two up to 64 MiB (few regrowths), then whole MiB (no doubling of big ones)."""
    if needed > 64 * MIN_SEGMENT:
        return -(-needed // MIN_SEGMENT) * MIN_SEGMENT
    size = MIN_SEGMENT
    while size < needed:
        size <<= 1
    return size


def new_segment_fd(size: int, name: str = "tensorline") -> int:
    """A memfd of ``size`` bytes, sealed so that it can never shrink under a mapping of it (which
    would turn the next access into SIGBUS)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Segment:
    """One memfd-backed shared mapping."""

    __slots__ = ("address", "fd", "map", "size")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        probe = np.frombuffer(self.map, np.uint8, count=1)
        self.address = int(probe.ctypes.data)
        del probe  # releases the buffer export, so that close() works

    @classmethod
    def create(cls, size: int, name: str = "tensorline") -> Segment:
        fd = new_segment_fd(size, name)
        try:
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def adopt(cls, fd: int, size: int, *, verify: bool) -> Segment:
        """Map a segment the peer sent. ``verify`` (for an untrusted peer): it must be a sealed
        memfd of at least ``size`` bytes that nobody can shrink."""
        try:
            if verify:
                try:
                    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                except OSError:
                    raise ProtocolError("segment fd is not a sealable memfd") from None
                if seals & _SEALS != _SEALS:
                    raise ProtocolError("segment is not sealed against shrinking")
                if os.fstat(fd).st_size < size:
                    raise ProtocolError("segment is smaller than announced")
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        # A view of it may still be alive (a node kept an input array): the mapping then goes
        # when that view does.
        with contextlib.suppress(BufferError):
            self.map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(slots=True)
class Outbox:
    """The sending side of one direction: its segment, grown on demand, and the pickler of its
    direct messages (reused: one message at a time per direction)."""

    segment: Segment | None = None
    inline_max: int = DEFAULT_INLINE_MAX
    name: str = "tensorline"
    buffer: io.BytesIO | None = None
    pickler: _Pickler | None = None
    # Where a grown segment comes from (default: a memfd made here). A sandbox worker may not
    # create memfds (memory no rlimit counts until mapped): the server makes its segments.
    allocate: Callable[[int], Segment] | None = None
    # WorkerPickler on a worker's side: see there.
    pickler_class: type[_Pickler] = field(default_factory=lambda: _Pickler)

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment = None


@dataclass(slots=True)
class Inbox:
    """The receiving side of one direction: the peer's current segment, mapped."""

    segment: Segment | None = None

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment = None


# Values that travel as they are (checked by exact type first: most message fields are these).
_PLAIN = frozenset({str, int, float, bool, type(None), Json})
# What a worker may send besides exact builtins (its pickler refuses the rest, see
# WorkerPickler); SafeUnpickler is the server's side of the same rule.
_SENDABLE = frozenset({np.ndarray, Audio, Json, Tagged, ShmArray, ShmBytes, complex,
                       pickle.PickleBuffer})
# Array kinds whose ``dtype.str`` describes them completely (no fields, no objects).
_SIMPLE_KINDS = frozenset("biufcmMSU")


def _inline_array(dtype: Any, shape: Any, data: Any) -> npt.NDArray[Any]:
    """Rebuild a small array pickled by ``_reduce_array`` (the peer may be hostile: only a
    plain dtype string, a shape of non-negative ints and a bytes-like buffer are accepted)."""
    if type(dtype) is not str or type(shape) is not tuple or not isinstance(
            data, bytes | bytearray):
        raise ProtocolError("malformed inline array")
    for n in shape:
        if type(n) is not int or n < 0:
            raise ProtocolError("malformed inline array shape")
    dt = _DTYPES.get(dtype)
    if dt is None:
        dt = np.dtype(dtype)
        if dt.hasobject:
            raise ProtocolError("object arrays cannot cross the sandbox boundary")
        if len(_DTYPES) < 256:
            _DTYPES[dtype] = dt
    flat = np.frombuffer(data, dt)
    if len(shape) == 1 and flat.shape == shape:
        return flat
    return flat.reshape(shape)


# Dtype strings seen in inline arrays (a handful in practice; bounded against a hostile peer).
_DTYPES: dict[str, np.dtype[Any]] = {}


def _reduce_array(value: Any) -> Any:
    dtype = value.dtype
    if dtype.kind in _SIMPLE_KINDS and dtype.fields is None:
        if not value.flags.c_contiguous:
            if value.flags.f_contiguous:
                return value.__reduce_ex__(5)  # keeps its layout (numpy's ``_frombuffer``)
            # numpy would pickle a strided array with ``_reconstruct``, which SafeUnpickler
            # refuses: send a contiguous copy.
            value = np.ascontiguousarray(value)
        # A writable array pickles as a bytearray: the copy the peer gets is writable too.
        if value.ndim == 1:
            # numpy rebuilds it itself (no Python frame on the receiving side); it refuses
            # object dtypes, whatever a hostile peer names.
            return (np.frombuffer, (pickle.PickleBuffer(value), dtype.str))
        return (_inline_array, (dtype.str, value.shape, pickle.PickleBuffer(value)))
    return value.__reduce_ex__(5)


# The deepest JSON value that crosses the sandbox boundary (far below the recursion limit of
# the encoder that writes it into a response).
MAX_JSON_DEPTH = 256


def _reduce_json(value: Json) -> Any:
    """A ``Json`` crosses as its JSON text, encoded by the sender: a value whose objects are
    shared (``[x, x]`` nested 40 deep is 40 lists) pickles small but expands to 2**40 leaves
    when written out, so a hostile worker's would hang the server's encoder. Its text is
    what it is: the receiver parses it in time linear in its size (``_json_from_text``)."""
    text = json.dumps(value.value, separators=(",", ":"), allow_nan=False)
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and (
            json_depth(text) > MAX_JSON_DEPTH):
        raise ValueError(f"a JSON value nested more than {MAX_JSON_DEPTH} levels deep cannot "
                         "leave the sandbox")
    return (_json_from_text, (text,))


def _json_from_text(text: Any) -> Json:
    """The receiving end of ``_reduce_json`` (nothing else builds a ``Json`` from a message)."""
    if type(text) is not str:
        raise ProtocolError("a JSON value must come as its text")
    try:
        return Json(loads(text, max_depth=MAX_JSON_DEPTH))
    except JsonRejected as exc:
        raise ProtocolError(f"bad JSON value: {exc.reason}") from None


def _reduce_audio(value: Audio) -> Any:
    samples = value.samples  # an array, or its place in the segment (``pack`` put it there)
    if type(samples) not in (np.ndarray, ShmArray):
        samples = np.asarray(samples)
    return (_audio_from, (samples, int(value.sample_rate)))


def _audio_from(samples: Any, sample_rate: Any) -> Audio:
    """The receiving end of ``_reduce_audio``: an array (or its place in the segment) and an
    int, nothing else (an ``Audio`` made by its class from a message could hold anything)."""
    if type(samples) not in (np.ndarray, ShmArray) or type(sample_rate) is not int:
        raise ProtocolError("audio must be an array of samples and an int sample rate")
    return Audio(samples, sample_rate)


def _reduce_tagged(value: Tagged) -> Any:
    # The executor's rules for a node's tagged output (``wire_problem``), so that breaking
    # one is the node's error (TypeError), not a message the server refuses.
    metadata = value.metadata
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of strings, got {type(metadata).__name__}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata keys and values must be strings")
    if isinstance(value.value, Tagged):
        raise TypeError("a Tagged value cannot hold another Tagged value")
    return (_tagged_from, (value.value, {str(k): str(v) for k, v in metadata.items()}))


def _tagged_from(value: Any, metadata: Any) -> Tagged:
    """The receiving end of ``_reduce_tagged``: a value that is not tagged itself, and a dict of
    strings."""
    if type(value) is Tagged or type(metadata) is not dict or not all(
            type(k) is str and type(v) is str for k, v in metadata.items()):
        raise ProtocolError("a tagged value must be an untagged value and a dict of strings")
    return Tagged(value, metadata)


class _Pickler(pickle.Pickler):
    # Values are built on the other side by functions that check what they get, never by
    # their classes (which a message could fill with anything, or leave empty).
    dispatch_table = {np.ndarray: _reduce_array, Json: _reduce_json, Audio: _reduce_audio,
                      Tagged: _reduce_tagged}


class WorkerPickler(_Pickler):
    """A worker's pickler: it refuses what ``SafeUnpickler`` would refuse on the server's side
    (any object but the value types), so a node returning, say, ``Json({"x": object()})`` fails
    with the node's own TypeError instead of a protocol violation that ends its worker."""

    def reducer_override(self, obj: Any) -> Any:
        # Called for objects other than exact builtins (str, int, dict, list, ...), and for the
        # classes and functions a reduction names (pickled by reference: the same allow-list).
        if type(obj) in _SENDABLE or isinstance(obj, np.generic | np.dtype):
            return NotImplemented  # pickled as usual (ndarray through dispatch_table)
        if callable(obj) and SafeUnpickler.allows(getattr(obj, "__module__", None),
                                                  getattr(obj, "__qualname__", None)):
            return NotImplemented
        raise TypeError(f"cannot send a value of type {type(obj).__name__} out of the sandbox")


def _dumps(value: Any, header: bytes = b"", pickler: type[_Pickler] = _Pickler) -> bytes:
    buffer = io.BytesIO()
    buffer.write(header)
    writer = pickler(buffer, protocol=5)
    writer.fast = True  # no memo: the peer accepts trees only (``refuse_sharing``)
    writer.dump(value)
    return buffer.getvalue()


def _dumps_direct(value: Any, outbox: Outbox) -> bytes:
    """``_dumps(value, _DIRECT_HEADER)`` with the outbox's pickler and buffer (making them per
    message costs as much as pickling a 1 KiB request)."""
    buffer, pickler = outbox.buffer, outbox.pickler
    if buffer is None or pickler is None:
        buffer = outbox.buffer = io.BytesIO()
        pickler = outbox.pickler = outbox.pickler_class(buffer, protocol=5)
        pickler.fast = True  # no memo: the peer accepts trees only (``refuse_sharing``)
    else:
        buffer.seek(0)
        buffer.truncate()
    buffer.write(_DIRECT_HEADER)
    try:
        pickler.dump(value)
    finally:
        pickler.clear_memo()  # keeps no reference to the values sent
    message = buffer.getvalue()
    if len(message) > MAX_MESSAGE:
        outbox.buffer = outbox.pickler = None  # do not keep a big buffer around
    return message


def _direct(value: Any, inline_max: int) -> bool:
    """True when ``value`` can be pickled as it is (see the module docstring): exact builtin
    containers of plain values, bytes and small C-contiguous arrays of simple dtypes."""
    kind = type(value)
    if kind in _PLAIN:
        return True
    items: Any
    if kind is tuple or kind is list:
        items = value
    elif kind is dict:
        items = value.values()
    elif kind is np.ndarray:
        dtype = value.dtype
        return (value.nbytes <= inline_max and value.flags.c_contiguous
                and dtype.kind in _SIMPLE_KINDS and dtype.fields is None)
    elif kind is bytes:
        return len(value) <= inline_max
    else:
        return isinstance(value, np.generic) and not isinstance(value, np.void)
    # A loop, not all() over a generator: that costs twice as much, on every message. Plain
    # items (most of them) are checked here, without a call each.
    for item in items:  # noqa: SIM110
        if type(item) not in _PLAIN and not _direct(item, inline_max):
            return False
    return True


class _Layout:
    __slots__ = ("arrays", "echo", "end", "inline_max")

    def __init__(self, inline_max: int, echo: Segment | None) -> None:
        self.inline_max = inline_max
        self.echo = echo
        self.arrays: list[tuple[int, Any]] = []
        self.end = 0

    def place(self, nbytes: int, source: Any) -> int:
        offset = self.end
        self.arrays.append((offset, source))
        self.end = _align(offset + nbytes)
        return offset

    def encode(self, value: Any) -> Any:
        if type(value) in _PLAIN:
            return value
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise TypeError("arrays of Python objects cannot leave the process")
            if value.nbytes <= self.inline_max:
                return value
            fortran = bool(value.flags.f_contiguous and not value.flags.c_contiguous)
            echo = self.echo
            if echo is not None and (value.flags.c_contiguous or fortran):
                start = int(value.__array_interface__["data"][0]) - echo.address
                if start >= 0 and start + value.nbytes <= echo.size:
                    return ShmArray(start, value.dtype, value.shape, fortran, True)
            offset = self.place(value.nbytes, value)
            return ShmArray(offset, value.dtype, value.shape, fortran)
        if isinstance(value, bytes | bytearray | memoryview):
            data = memoryview(value).cast("B")
            if data.nbytes <= self.inline_max:
                return bytes(data)
            return ShmBytes(self.place(data.nbytes, data), data.nbytes)
        if isinstance(value, dict):
            return {k: self.encode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.encode(v) for v in value]
        if isinstance(value, tuple):
            return tuple([self.encode(v) for v in value])
        if isinstance(value, Tagged):
            if not isinstance(value.metadata, Mapping):  # as the executor's wire_problem says
                raise TypeError("metadata must be a dict of strings, got "
                                f"{type(value.metadata).__name__}")
            return Tagged(self.encode(value.value), dict(value.metadata))
        if isinstance(value, Audio):
            return Audio(self.encode(value.samples), value.sample_rate)
        if value is None or isinstance(value, str | int | float | bool | Json | np.generic):
            return value
        raise TypeError(
            f"a value of type {type(value).__name__} cannot cross the sandbox boundary; use "
            "numpy arrays, Audio, Json, str, bytes, Tagged or lists of those"
        )


def _copy_in(segment: Segment, offset: int, source: Any) -> None:
    if isinstance(source, np.ndarray):
        order: Literal["C", "F"] = (
            "F" if source.flags.f_contiguous and not source.flags.c_contiguous else "C")
        dest = np.ndarray(source.shape, source.dtype, buffer=segment.map, offset=offset,
                          order=order)
        np.copyto(dest, source, casting="no")
    else:
        segment.map[offset:offset + source.nbytes] = source


def pack(value: Any, outbox: Outbox, echo: Segment | None = None) -> tuple[bytes, Segment | None]:
    """Frame ``value``: the control message to send, and a new segment whose fd must ride along
    with it (None when the current one was big enough). Arrays lying in ``echo`` (the segment
    the peer sent us) are referenced there instead of copied."""
    if _direct(value, outbox.inline_max):
        message = _dumps_direct(value, outbox)
        if len(message) <= MAX_MESSAGE + _HEADER.size:
            return message, None
    layout = _Layout(outbox.inline_max, echo)
    encoded = layout.encode(value)
    body = _dumps(encoded, pickler=outbox.pickler_class)
    needed = layout.end
    spill = len(body) > MAX_MESSAGE
    spill_offset = needed
    if spill:
        needed = spill_offset + len(body)
    fresh: Segment | None = None
    if needed:
        if outbox.segment is None or outbox.segment.size < needed:
            size = _segment_size(needed)
            fresh = (outbox.allocate(size) if outbox.allocate is not None
                     else Segment.create(size, outbox.name))
            if outbox.segment is not None:
                outbox.segment.close()
            outbox.segment = fresh
        segment = outbox.segment
        for offset, source in layout.arrays:
            _copy_in(segment, offset, source)
        if spill:
            segment.map[spill_offset:spill_offset + len(body)] = body
    flags = (FLAG_NEW_SEGMENT if fresh is not None else 0) | (FLAG_SPILLED if spill else 0)
    header = _HEADER.pack(flags, fresh.size if fresh else 0, spill_offset if spill else 0,
                          len(body) if spill else 0)
    return (header if spill else header + body), fresh


def send(sock: socket.socket, message: bytes, fresh: Segment | None) -> None:
    """Send one framed message (whole or not at all: the socket is SOCK_SEQPACKET)."""
    if fresh is None:
        sock.send(message)
    else:
        sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  array.array("i", [fresh.fd]))])


def recv_raw(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the fds that came with it. Empty bytes mean the peer closed."""
    data, ancdata, msg_flags, _ = sock.recvmsg(MAX_MESSAGE + _HEADER.size, _FD_ANCILLARY)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            usable = len(payload) - len(payload) % array.array("i").itemsize
            fds.extend(array.array("i", payload[:usable]))
    if msg_flags & _TRUNCATED:
        for fd in fds:
            os.close(fd)
        raise ProtocolError("truncated control message")
    return data, fds


class SafeUnpickler(pickle.Unpickler):
    """Resolves only the globals that values are built from; anything else is refused."""

    ALLOWED: frozenset[tuple[str, str]] = frozenset({
        ("numpy", "dtype"),
        ("numpy", "frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "scalar"),
        (__name__, "_json_from_text"),
        (__name__, "_audio_from"),
        (__name__, "_tagged_from"),
        (__name__, "ShmArray"),
        (__name__, "ShmBytes"),
        (__name__, "_inline_array"),
        ("builtins", "complex"),
    })

    @classmethod
    def allows(cls, module: object, name: object) -> bool:
        """Whether the global ``module.name`` may be resolved."""
        return (module, name) in cls.ALLOWED or (
            module == "numpy.dtypes" and isinstance(name, str) and name.endswith("DType"))

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if self.allows(module, name):
            # Allowed globals are resolved once per process (an import lookup each otherwise).
            found = _RESOLVED.get(key)
            if found is None:
                found = _RESOLVED[key] = super().find_class(module, name)
            return found
        raise ProtocolError(f"forbidden object in a sandbox message: {module}.{name}")


_RESOLVED: dict[tuple[str, str], Any] = {}


class DirectUnpickler(SafeUnpickler):
    """For a message flagged direct: no segment references either (nothing resolves them)."""

    ALLOWED = SafeUnpickler.ALLOWED - {(__name__, "ShmArray"), (__name__, "ShmBytes")}


# GET, BINGET, LONG_BINGET and DUP: the only ways a pickle uses one object twice (marked
# ``_SHARES`` in ``_ARGUMENT_SIZES``).
_SHARING_OPCODES = frozenset({"GET", "BINGET", "LONG_BINGET", "DUP"})
_SHARES = -9
# Opcodes that put what they pop into the container below it (the container stays).
_INTO_CONTAINER = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
# Opcodes a message from an untrusted peer may hold, and how deep its values may nest (see
# ``refuse_sharing``; an honest message nests a handful of levels).
MAX_OPCODES = 1 << 20
MAX_NESTING = 100
_STOP = ord(".")
_MARK = ord("(")


def _stack_effects() -> list[tuple[int, bool, int, bool] | None]:
    """Each opcode's effect on the unpickler's stack (from pickletools' descriptions): how
    many items it pops, whether it pops down to the last mark, how many it pushes (MARK
    pushes a mark, counted apart), and whether it fills the container left on top instead of
    pushing. None: no effect."""
    mark = pickletools.markobject
    effects: list[tuple[int, bool, int, bool] | None] = [None] * 256
    for op in pickletools.opcodes:
        before, after = op.stack_before, op.stack_after
        if op.name == "MARK" or before == after:  # MARK; MEMOIZE, READONLY_BUFFER
            continue
        into = op.name in _INTO_CONTAINER
        fixed = [item for item in before if item is not mark and item is not
                 pickletools.stackslice]
        pops = len(fixed) - (1 if into else 0)
        effects[ord(op.code)] = (pops, mark in before, 0 if into else len(after), into)
    return effects


_STACK_EFFECTS = _stack_effects()
# An opcode that nests what it pops in what it leaves (a tuple of its items, a list filled, a
# call on its arguments): each deepens the deepest value by one at most, so a pickle with no
# more of them than MAX_NESTING needs no closer look (``_check_nesting``).
_NESTING = frozenset(code for code, effect in enumerate(_STACK_EFFECTS)
                     if effect is not None and (effect[0] or effect[1])
                     and (effect[2] or effect[3]))


def _argument_sizes() -> list[int | None]:
    """What follows each opcode byte of a pickle (pickletools' ``ArgumentDescriptor.n``): 0
    nothing, n > 0 that many bytes, -1 a line, -2/-3/-4/-5 a length of 1 byte, 4 bytes
    (signed), 4 or 8 bytes, then that many bytes; -6 two lines (GLOBAL and INST, whose
    descriptor says one); ``_SHARES`` a memo get or DUP; ``_NESTS`` nothing, and it nests
    (``_NESTING``; INST, the one with an argument, is counted apart); None: not an opcode."""
    sizes: list[int | None] = [None] * 256
    for op in pickletools.opcodes:
        code = ord(op.code)
        sizes[code] = (-6 if op.name in ("GLOBAL", "INST")
                       else _SHARES if op.name in _SHARING_OPCODES
                       else (_NESTS if code in _NESTING else 0) if op.arg is None
                       else op.arg.n)
    return sizes


_NESTS = -10
_INST = ord("i")
_ARGUMENT_SIZES = _argument_sizes()


def refuse_sharing(buf: bytes | mmap.mmap, start: int, end: int) -> None:
    """ProtocolError unless the pickle in ``buf[start:end]`` builds every object once (a tree).

    A pickle from an untrusted peer may use one object many times (memo gets, DUP): 40 nested
    pairs sharing one child are 40 objects, and 2**40 to anything that walks them as a tree:
    the unpickler itself when such a tuple is a dict key or a set element (hashing a tuple
    hashes its items, again for every use), ``_decode``, every reader of the value after it.
    Honest senders pickle in fast mode (no memo), so a tree is all they send; checking that
    needs no more than stepping over each opcode's argument, and refuses before unpickling.

    At most ``MAX_OPCODES`` opcodes: a message the size of a segment made of one-byte opcodes
    would hold the event loop for seconds here and make the unpickler build as many objects
    (an honest message has a few per value; its bulk is in long arguments).

    And values nested at most ``MAX_NESTING`` deep: hashing a tuple recurses in C through its
    items with no guard, so a dict key of 300,000 nested 1-tuples (a 300 KB message)
    overflowed the server's stack while unpickling. Only a pickle with more nesting opcodes
    than that could, and only it gets the closer look (``_check_nesting``)."""
    sizes = _ARGUMENT_SIZES
    nests = 0
    pos = start
    for _ in range(MAX_OPCODES):
        if pos >= end:
            break
        op = buf[pos]
        pos += 1
        size = sizes[op]
        if size == 0:
            if op == _STOP:
                if nests > MAX_NESTING:
                    _check_nesting(buf, start, pos)
                return
            continue
        if size == _NESTS:
            nests += 1
            continue
        if size is None:
            raise ProtocolError(f"not a pickle opcode: {op:#04x}")
        if size == _SHARES:
            raise ProtocolError("an object used twice in a sandbox message")
        pos = _skip_argument(buf, pos, end, size)
        if op == _INST:
            nests += 1
    else:
        raise ProtocolError(f"more than {MAX_OPCODES} opcodes in a sandbox message")
    raise ProtocolError("truncated pickle")


def _skip_argument(buf: bytes | mmap.mmap, pos: int, end: int, size: int) -> int:
    """Where the opcode whose argument starts at ``pos`` ends (``size``: see
    ``_argument_sizes``; not 0)."""
    if size > 0:
        return pos + size
    if size == -2:
        return pos + 1 + buf[pos]
    if size == -1 or size == -6:
        for _ in range(1 if size == -1 else 2):
            newline = buf.find(b"\n", pos, end)
            if newline < 0:
                raise ProtocolError("truncated pickle")
            pos = newline + 1
        return pos
    width = 8 if size == -5 else 4
    length = int.from_bytes(buf[pos:pos + width], "little", signed=size == -3)
    if length < 0:
        raise ProtocolError("negative length in a pickle")
    return pos + width + length


def _check_nesting(buf: bytes | mmap.mmap, start: int, end: int) -> None:
    """ProtocolError if a value of the pickle in ``buf[start:end]`` (checked by
    ``refuse_sharing`` otherwise) nests more than ``MAX_NESTING`` deep: the depth of each item
    on a model of the unpickler's stack, and where its marks are."""
    sizes, effects = _ARGUMENT_SIZES, _STACK_EFFECTS
    depths: list[int] = []
    marks: list[int] = []
    pos = start
    while pos < end:
        op = buf[pos]
        pos += 1
        effect = effects[op]
        if effect is not None:
            _follow(effect, depths, marks)
        elif op == _MARK:
            marks.append(len(depths))
        size = sizes[op]
        if size and size != _NESTS:
            pos = _skip_argument(buf, pos, end, size)


def _follow(effect: tuple[int, bool, int, bool], depths: list[int], marks: list[int]) -> None:
    """Apply one opcode's stack effect (see ``_stack_effects``) to the depths of ``_check_nesting``.
    What the unpickler would refuse (popping past a mark, or an empty stack) is refused here."""
    pops, to_mark, pushes, into = effect
    fence = marks[-1] if marks else 0
    deepest = -1
    if pops:
        if len(depths) - pops < fence:
            raise ProtocolError("malformed pickle: stack underflow")
        deepest = max(depths[-pops:])
        del depths[-pops:]
    if to_mark:
        if not marks:
            raise ProtocolError("malformed pickle: no mark")
        at = marks.pop()
        if at < len(depths):
            deepest = max(deepest, max(depths[at:]))
            del depths[at:]
        fence = marks[-1] if marks else 0
    if not (into or pushes):  # POP, POP_MARK, STOP
        return
    depth = deepest + 1
    if depth > MAX_NESTING:
        raise ProtocolError(f"values nested more than {MAX_NESTING} deep in a sandbox message")
    if into:
        if len(depths) <= fence:
            raise ProtocolError("malformed pickle: no container")
        if depth > depths[-1]:
            depths[-1] = depth
    else:
        depths.extend([depth] * pushes)


def _loads(body: bytes | memoryview, safe: bool, direct: bool = False, start: int = 0) -> Any:
    """Unpickle ``body[start:]`` (restricted when ``safe``: the caller checked it with
    ``refuse_sharing``)."""
    if safe:
        file = io.BytesIO(body)  # shares a bytes body, no copy
        file.seek(start)
        return (DirectUnpickler if direct else SafeUnpickler)(file).load()
    return pickle.loads(memoryview(body)[start:] if start else body)


def unpack(data: bytes, fds: list[int], inbox: Inbox, *, safe: bool, copy: bool,
           max_segment: int = 1 << 62, echo: Segment | None = None) -> Any:
    """Decode one message. ``copy``: arrays own their memory (server side, the segment is reused
    by the next call); otherwise they are read-only views of the segment (worker side).
    ``safe``: the peer is untrusted (restricted unpickling, verified segments of at most
    ``max_segment`` bytes)."""
    if len(data) < _HEADER.size:
        for fd in fds:
            os.close(fd)
        raise ProtocolError("short control message")
    flags, new_size, spill_offset, spill_len = _HEADER.unpack_from(data)
    if flags == FLAG_DIRECT and not fds:
        if safe:
            refuse_sharing(data, _HEADER.size, len(data))
        return _loads(data, safe, True, _HEADER.size)
    if flags & FLAG_NEW_SEGMENT:
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("a new segment was announced without exactly one fd")
        if new_size > max_segment:
            os.close(fds[0])
            raise ProtocolError(f"segment of {new_size} bytes exceeds the {max_segment} limit")
        adopted = Segment.adopt(fds[0], new_size, verify=safe)
        if inbox.segment is not None:
            inbox.segment.close()
        inbox.segment = adopted
    elif fds:
        for fd in fds:
            os.close(fd)
        raise ProtocolError("unexpected fds on a control message")
    segment = inbox.segment
    if flags & FLAG_SPILLED:
        if segment is None or spill_offset + spill_len > segment.size:
            raise ProtocolError("spilled body outside the segment")
        if safe:
            # A copy: the peer could rewrite its segment between the check and the unpickling.
            spilled = segment.map[spill_offset:spill_offset + spill_len]
            refuse_sharing(spilled, 0, len(spilled))
            encoded = _loads(spilled, safe, bool(flags & FLAG_DIRECT))
        else:
            body = memoryview(segment.map)[spill_offset:spill_offset + spill_len]
            try:
                encoded = _loads(body, safe, bool(flags & FLAG_DIRECT))
            finally:
                body.release()
    else:
        if safe:
            refuse_sharing(data, _HEADER.size, len(data))
        encoded = _loads(data, safe, bool(flags & FLAG_DIRECT), _HEADER.size)
    if flags & FLAG_DIRECT:
        return encoded
    return _decode(encoded, segment, copy, echo)


def _decode(value: Any, segment: Segment | None, copy: bool, echo: Segment | None) -> Any:
    if isinstance(value, ShmArray):
        return _array_from(value, echo if value.echo else segment, copy)
    if isinstance(value, ShmBytes):
        if segment is None or value.offset + value.nbytes > segment.size or value.offset < 0:
            raise ProtocolError("bytes outside the segment")
        return bytes(segment.map[value.offset:value.offset + value.nbytes])
    if isinstance(value, dict):
        return {k: _decode(v, segment, copy, echo) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, segment, copy, echo) for v in value]
    if isinstance(value, tuple):
        return tuple(_decode(v, segment, copy, echo) for v in value)
    if isinstance(value, Tagged):
        return Tagged(_decode(value.value, segment, copy, echo), value.metadata)
    if isinstance(value, Audio):
        return Audio(_decode(value.samples, segment, copy, echo), value.sample_rate)
    return value


def _array_from(ref: ShmArray, segment: Segment | None, copy: bool) -> npt.NDArray[Any]:
    dtype = np.dtype(ref.dtype)
    if dtype.hasobject:
        raise ProtocolError("object arrays cannot cross the sandbox boundary")
    shape = tuple(int(n) for n in ref.shape)
    if any(n < 0 for n in shape):
        raise ProtocolError("negative array dimension")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if segment is None or ref.offset < 0 or ref.offset + nbytes > segment.size:
        raise ProtocolError("array outside the segment")
    view: npt.NDArray[Any] = np.ndarray(shape, dtype, buffer=segment.map, offset=ref.offset,
                                        order="F" if ref.fortran else "C")
    if copy:
        return view.copy(order="K")
    view.flags.writeable = False
    return view
