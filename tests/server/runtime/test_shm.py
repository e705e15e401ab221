"""The framing between server and worker, without processes: round trips, and what the server
refuses from an untrusted worker (forbidden pickles, unsealed or oversized segments)."""

from __future__ import annotations

import os
import pickle
import socket

import numpy as np
import pytest

from tensorline.client._values import Audio, Json, Tagged
from tensorline.server.runtime import _shm


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
