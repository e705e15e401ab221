"""The framing between server and worker, without processes: round trips, and what the server
refuses from an untrusted worker (forbidden pickles, unsealed or oversized segments)."""

from __future__ import annotations

import os
import pickle
import socket

import numpy as np
import pytest

from tensorline.server.runtime.sandbox import _shm
from tensorline.wire._values import Audio, Json, Tagged


def transfer(value: object, *, safe: bool = True, inline_max: int = 1024) -> object:
    outbox, inbox = _shm.Outbox(inline_max=inline_max), _shm.Inbox()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        message, fresh = _shm.pack(value, outbox)
        _shm.send(a, message, fresh)
        data, fds = _shm.recv_raw(b)
        return _shm.unpack(data, fds, inbox, safe=safe, copy=True)
    finally:
        a.close()
        b.close()
        outbox.close()
        inbox.close()


def test_round_trip_mixed_values() -> None:
    big = np.arange(100_000, dtype=">i8").reshape(100, 1000)
    value = {"a": big, "b": [Audio(np.zeros(10, np.int16), 8000), Json([1]), "s", b"x" * 5000],
             "c": Tagged(np.float32(2.5), {"m": "1"}), "d": ("t", None, 3, 1.5, True)}
    out = transfer(value)
    assert isinstance(out, dict)
    assert out["a"].dtype == big.dtype and np.array_equal(out["a"], big)
    assert out["b"][1:] == value["b"][1:]  # type: ignore[index]
    assert out["c"] == value["c"] and out["d"] == value["d"]


def test_unsupported_values_are_refused_by_the_sender() -> None:
    with pytest.raises(TypeError, match="cannot cross the sandbox boundary"):
        _shm.pack({"x": object()}, _shm.Outbox())
    with pytest.raises(TypeError, match="Python objects"):
        _shm.pack(np.array([object()] * 5000), _shm.Outbox())


class Evil:
    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, ("echo pwned",))


def test_forbidden_globals_are_refused() -> None:
    body = pickle.dumps(("ok", Evil(), 0.0), protocol=5)
    message = _shm._HEADER.pack(0, 0, 0, 0) + body
    with pytest.raises(_shm.ProtocolError, match="forbidden object"):
        _shm.unpack(message, [], _shm.Inbox(), safe=True, copy=True)


def test_unsealed_or_oversized_segments_are_refused() -> None:
    fd = os.memfd_create("unsealed")
    os.ftruncate(fd, 1 << 20)
    header = _shm._HEADER.pack(_shm.FLAG_NEW_SEGMENT, 1 << 20, 0, 0)
    with pytest.raises(_shm.ProtocolError, match=r"sealable|sealed"):
        _shm.unpack(header + pickle.dumps(None), [fd], _shm.Inbox(), safe=True, copy=True)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by the refusal
    sealed = _shm.Segment.create(1 << 20)
    fd = os.dup(sealed.fd)
    sealed.close()
    with pytest.raises(_shm.ProtocolError, match="exceeds"):
        _shm.unpack(header + pickle.dumps(None), [fd], _shm.Inbox(), safe=True, copy=True,
                    max_segment=1 << 10)


def test_segments_cannot_be_shrunk_by_the_peer() -> None:
    segment = _shm.Segment.create(1 << 20)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(segment.fd, 0)
    finally:
        segment.close()


def test_arrays_sent_back_unchanged_are_not_copied_again() -> None:
    server_out, worker_in = _shm.Outbox(inline_max=1024), _shm.Inbox()
    worker_out, server_in = _shm.Outbox(inline_max=1024), _shm.Inbox()
    data = np.arange(50_000, dtype=np.float64).reshape(500, 100)
    try:
        message, _ = _shm.pack({"in": data}, server_out)
        seg = server_out.segment
        assert seg is not None
        received = _shm.unpack(message, [os.dup(seg.fd)], worker_in, safe=False, copy=False)
        view = received["in"]
        assert not view.flags.writeable
        # The worker returns its input and a reshaped view of it: both refer to the server's
        # own segment, nothing lands in the worker's.
        reply, fresh = _shm.pack(("ok", [view, view.T, view[:, ::2]], 0.0), worker_out,
                                 worker_in.segment)
        assert fresh is not None  # only the strided one needed a segment
        refs = pickle.loads(memoryview(reply)[_shm._HEADER.size:])[1]
        assert [r.echo for r in refs] == [True, True, False]
        got = _shm.unpack(reply, [os.dup(fresh.fd)], server_in, safe=True, copy=True,
                          echo=server_out.segment)[1]
        assert np.array_equal(got[0], data) and np.array_equal(got[1], data.T)
        assert np.array_equal(got[2], data[:, ::2]) and got[1].flags.f_contiguous
        del view, received
    finally:
        for box in (server_out, worker_in, worker_out, server_in):
            box.close()


def test_small_messages_travel_direct_and_keep_their_values() -> None:
    arrays = [np.arange(12, dtype=">i4").reshape(3, 4), np.full((), 1.5, np.float32),
              np.array(["ab", "c"]), np.zeros((0, 3), np.complex64),
              np.arange(6, dtype=np.uint8)[::2]]  # strided: still inline, by numpy's reduce
    value = ("ok", {"a": arrays, "b": (b"xy", "s", None, 3, 2.5, True)}, np.float64(2.0), [1])
    message, fresh = _shm.pack(value, _shm.Outbox())
    assert fresh is None
    assert message[0] == _shm.FLAG_DIRECT or not _shm._direct(value, _shm.DEFAULT_INLINE_MAX)
    out = transfer(value)
    assert isinstance(out, tuple)
    for got, sent in zip(out[1]["a"], arrays, strict=True):
        assert got.dtype == sent.dtype and got.shape == sent.shape
        assert np.array_equal(got, sent)
        assert got.flags.writeable  # a writable array arrives writable, as before
    assert out[1]["b"] == value[1]["b"] and out[2] == 2.0 and out[3] == [1]  # type: ignore[index]


def test_direct_messages_are_flagged_only_when_nothing_needs_a_segment() -> None:
    small = np.ones(256, np.float32)
    assert _shm.pack(("call", 1, {"in": small}, None, [2]), _shm.Outbox())[0][0] == \
        _shm.FLAG_DIRECT
    for value in ({"in": np.ones(100_000)}, {"in": small.reshape(16, 16).T},
                  {"in": bytearray(b"x")}, {"in": Tagged(small, {})}, {"in": b"x" * 5000}):
        message, _ = _shm.pack(value, _shm.Outbox(inline_max=1024))
        assert not message[0] & _shm.FLAG_DIRECT
    # bytearray is not pickled as it is: it arrives as bytes, as it always did
    assert transfer({"in": bytearray(b"xy")}) == {"in": b"xy"}


def test_a_direct_message_cannot_carry_segment_references() -> None:
    # A hostile worker flags a message direct to skip the decode walk, with a raw descriptor.
    body = pickle.dumps(("ok", _shm.ShmArray(0, np.dtype("f4"), (4,), False), 0.0), protocol=5)
    message = _shm._HEADER.pack(_shm.FLAG_DIRECT, 0, 0, 0) + body
    with pytest.raises(_shm.ProtocolError, match="forbidden object"):
        _shm.unpack(message, [], _shm.Inbox(), safe=True, copy=True)
    body = pickle.dumps(("ok", Evil(), 0.0), protocol=5)
    with pytest.raises(_shm.ProtocolError, match="forbidden object"):
        _shm.unpack(_shm._HEADER.pack(_shm.FLAG_DIRECT, 0, 0, 0) + body, [], _shm.Inbox(),
                    safe=True, copy=True)


class _Call:
    """Pickles as a call of ``function(*args)``: what a hostile worker can put in a reply."""

    def __init__(self, function: object, *args: object) -> None:
        self.function = function
        self.args = args

    def __reduce__(self) -> tuple[object, ...]:
        return (self.function, self.args)


@pytest.mark.parametrize("args", [
    ("O", (1,), b"\0" * 8),  # object dtype: pointers from the peer
    ("|O", (1,), b"\0" * 8),
    ("f4", (-1,), b"\0" * 8),
    ("f4", (3,), b"\0" * 8),  # shape does not match the data
    (np.dtype("f4"), (2,), b"\0" * 8),  # only a dtype string is accepted
    ("f4", [2], b"\0" * 8),
])
def test_malformed_inline_arrays_are_refused(args: tuple[object, ...]) -> None:
    body = pickle.dumps(("ok", _Call(_shm._inline_array, *args), 0.0), protocol=5)
    for flags in (0, _shm.FLAG_DIRECT):
        with pytest.raises((_shm.ProtocolError, ValueError)):
            _shm.unpack(_shm._HEADER.pack(flags, 0, 0, 0) + body, [], _shm.Inbox(), safe=True,
                        copy=True)




@pytest.mark.parametrize("args", [
    (b"\0" * 8, "O"),  # object dtype: pointers from the peer
    (b"\0" * 16, "f8,O"),  # an object field in a structured dtype
    (b"\0" * 8, "f4", 4),  # more items than the buffer holds
    (b"\0" * 8, "f4", -1, 16),  # offset past the end
    ("text", "f4"),  # not a buffer
])
def test_hostile_frombuffer_calls_are_refused(args: tuple[object, ...]) -> None:
    """1-D inline arrays are rebuilt by numpy.frombuffer (an allowed global): whatever arguments
    a hostile worker gives it, numpy refuses to make an object array or read past the data."""
    body = pickle.dumps(("ok", _Call(np.frombuffer, *args), 0.0), protocol=5)
    for flags in (0, _shm.FLAG_DIRECT):
        with pytest.raises((_shm.ProtocolError, ValueError, TypeError)):
            _shm.unpack(_shm._HEADER.pack(flags, 0, 0, 0) + body, [], _shm.Inbox(), safe=True,
                        copy=True)


def test_small_arrays_keep_dtype_shape_and_writability() -> None:
    outbox, inbox = _shm.Outbox(), _shm.Inbox()
    readonly = np.arange(5, dtype=">i2")
    readonly.flags.writeable = False
    for value in (np.arange(7, dtype="<f4"), readonly, np.zeros(0, "<u8"),
                  np.arange(12, dtype="<i4").reshape(3, 4), np.float32(2.5) * np.ones(())):
        message, fresh = _shm.pack(("ok", value, 0.0), outbox)
        assert fresh is None
        out = _shm.unpack(message, [], inbox, safe=True, copy=True)[1]
        assert out.dtype == value.dtype and out.shape == value.shape
        assert np.array_equal(out, value)
        assert out.flags.writeable == value.flags.writeable


def nested_pairs(depth: int) -> tuple[object, ...]:
    """``depth`` nested pairs whose two items are one object: 2**depth leaves as a tree."""
    pair: tuple[object, ...] = (0,)
    for _ in range(depth):
        pair = (pair, pair)
    return pair


def direct_message(body: bytes) -> bytes:
    return _shm._HEADER.pack(_shm.FLAG_DIRECT, 0, 0, 0) + body


def frame_free(value: object) -> bytes:
    """``value``'s pickle (protocol 5, memo on) without PROTO, FRAME and STOP, to splice."""
    body = pickle.dumps(value, protocol=5)
    start = 2 + (9 if body[2] == 0x95 else 0)
    return body[start:-1]


@pytest.mark.parametrize("body", [
    # Shared objects by memo: a list holding nested pairs, and (hashed while unpickling, so
    # refused before) a dict keyed by them.
    pickle.dumps(("ok", {"out": [nested_pairs(20)]}, 0.0), protocol=5),
    b"\x80\x05}" + frame_free(nested_pairs(20)) + b"K\x01s.",
    # A shared string, and DUP: the other ways of using one object twice.
    pickle.dumps(("ok", {"a": "x" * 100, "b": None}, 0.0), protocol=5).replace(
        b"N", b"h\x02", 1),
    b"\x80\x05K\x012\x86.",
], ids=["memo", "dict key", "string", "dup"])
def test_a_message_that_uses_one_object_twice_is_refused(body: bytes) -> None:
    """An untrusted peer's pickle must build every object once: a tree is linear to walk and
    hash; 20 nested pairs sharing one child are 2**20 leaves to whatever walks them."""
    for message in (direct_message(body), _shm._HEADER.pack(0, 0, 0, 0) + body):
        with pytest.raises(_shm.ProtocolError, match="used twice"):
            _shm.unpack(message, [], _shm.Inbox(), safe=True, copy=True)


def test_an_honest_sender_sends_trees() -> None:
    """Fast mode: a value used twice (one array in two outputs, repeated strings) is written
    twice, and accepted."""
    array = np.arange(6.0)
    value = ("ok", {"a": array, "b": array, "c": ["same", "same"], "d": Tagged("t", {"k": "t"})},
             0.0)
    out = transfer(value)
    assert isinstance(out, tuple)
    assert np.array_equal(out[1]["a"], array) and np.array_equal(out[1]["b"], array)
    assert out[1]["c"] == ["same", "same"] and out[1]["d"] == Tagged("t", {"k": "t"})


@pytest.mark.parametrize(("body", "match"), [
    # numpy.ndarray((65536,)): memory the server never wrote.
    (b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x01\x00\x85\x85\x81.", "forbidden object"),
    # The value classes themselves, which a message could fill with anything.
    (b"\x80\x02ctensorline.wire._values\nAudio\n)\x81.", "forbidden object"),
    (b"\x80\x02ctensorline.wire._values\nJson\n)\x81.", "forbidden object"),
    # What builds them checks what it gets.
    (b"\x80\x02c" + _shm.__name__.encode() + b"\n_audio_from\nX\x01\x00\x00\x00xK\x01\x86R.",
     "audio must be"),
    (b"\x80\x02c" + _shm.__name__.encode() + b"\n_json_from_text\n]\x85R.", "its text"),
    (b"\x80\x02c" + _shm.__name__.encode() + b"\n_tagged_from\nN}K\x01K\x02s\x86R.",
     "dict of strings"),
], ids=["ndarray", "Audio", "Json", "audio samples", "json text", "tag map"])
def test_values_are_built_only_by_functions_that_check_them(body: bytes, match: str) -> None:
    with pytest.raises(_shm.ProtocolError, match=match):
        _shm.unpack(direct_message(body), [], _shm.Inbox(), safe=True, copy=True)


def test_json_crosses_as_text_within_its_depth() -> None:
    deep: object = 0
    for _ in range(_shm.MAX_JSON_DEPTH + 1):
        deep = [deep]
    with pytest.raises(ValueError, match="nested more than"):
        _shm.pack(Json(deep), _shm.Outbox())
    assert transfer(Json({"a": [1, 2.5, None, "x"]})) == Json({"a": [1, 2.5, None, "x"]})


def test_a_message_of_too_many_opcodes_is_refused() -> None:
    """A segment's worth of one-byte opcodes would hold the server's loop for seconds in the
    check and make the unpickler build as many objects."""
    body = b"\x80\x05" + b"N0" * _shm.MAX_OPCODES + b"N."
    with pytest.raises(_shm.ProtocolError, match="opcodes"):
        _shm.unpack(direct_message(body), [], _shm.Inbox(), safe=True, copy=True)


def nested(levels: int, leaf: object = 1) -> object:
    value: object = leaf
    for level in range(levels):
        value = [value] if level % 2 else (value,)
    return value


def test_values_nest_at_most_max_nesting_deep() -> None:
    """Hashing a tuple recurses in C through its items, unguarded: a dict key of 300,000 nested
    1-tuples overflowed the server's stack while it unpickled. The check follows the depth of
    every item on the unpickler's stack, whatever the opcodes that build it."""
    deepest = nested(_shm.MAX_NESTING)
    assert transfer(deepest) == deepest
    wide = [nested(3, leaf) for leaf in range(1000)]  # many nesting opcodes, all shallow
    assert transfer(wide) == wide
    with pytest.raises(_shm.ProtocolError, match="nested more than"):
        transfer(nested(_shm.MAX_NESTING + 1))
    # The crash's shape: 1-tuples by TUPLE1, then used as a key (SETITEM).
    key = b")" + b"\x85" * (_shm.MAX_NESTING + 1)
    with pytest.raises(_shm.ProtocolError, match="nested more than"):
        _shm.unpack(direct_message(b"\x80\x05}" + key + b"K\x01s."), [], _shm.Inbox(),
                    safe=True, copy=True)
    # Lists filled in place (APPEND), and tuples made from a mark (MARK ... TUPLE).
    for level in (b"]\x94(", b"("):
        closing = b"e" if level.startswith(b"]") else b"t"
        body = (b"\x80\x05" + level * (_shm.MAX_NESTING + 1) + b"K\x01"
                + closing * (_shm.MAX_NESTING + 1) + b".")
        with pytest.raises(_shm.ProtocolError, match="nested more than"):
            _shm.unpack(direct_message(body), [], _shm.Inbox(), safe=True, copy=True)


# Over MAX_NESTING 1-tuples side by side (shallow: each is one deep), then a tail.
MANY_TUPLES = b"\x80\x05" + b"N\x85" * (_shm.MAX_NESTING + 1)


@pytest.mark.parametrize("tail", [b"(\x85.", b"K\x01\x85(a.", b"e."])
def test_a_pickle_that_pops_what_it_never_pushed_is_refused(tail: bytes) -> None:
    """Past a mark, or with no container to fill, as the unpickler would refuse it. (A pickle
    with more nesting opcodes than MAX_NESTING is followed on the model of the stack.)"""
    assert _shm.unpack(direct_message(MANY_TUPLES + b"."), [], _shm.Inbox(), safe=True,
                       copy=True) == (None,)
    with pytest.raises(_shm.ProtocolError, match="malformed"):
        _shm.unpack(direct_message(MANY_TUPLES + tail), [], _shm.Inbox(), safe=True, copy=True)
