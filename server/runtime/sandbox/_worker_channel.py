"""A sandbox worker's end of its control channel: receiving the server's messages, sending
replies (a value that cannot cross becomes the error saying so), asking the server for a larger
reply segment, and telling it when the worker should be replaced.

``_worker._Worker`` serves requests on top of this; like it, this runs only in the worker.
"""

from __future__ import annotations

import os
import resource
import socket
from typing import TYPE_CHECKING, Any

from tensorline.server.runtime.sandbox import _isolation, _shm
from tensorline.server.runtime.sandbox._messages import (
    MEMORY,
    NODE,
    OK,
    PROCESS,
    SEGMENT_REFUSED,
    error,
    granted_size,
    segment_message,
    unhealthy_message,
)
from tensorline.server.runtime.sandbox._worker_errors import classify

if TYPE_CHECKING:
    from tensorline.server.runtime.sandbox._worker import WorkerConfig

# Descriptors a worker keeps free for its own work (a segment, a listing): with fewer left it
# asks to be replaced.
FD_RESERVE = 16


class _ServerGone(BaseException):
    """The control socket closed in the middle of a stream."""


class WorkerChannel:
    """The control socket, the shared-memory segments of both directions, and health."""

    def __init__(self, config: WorkerConfig, sock: socket.socket) -> None:
        self.config = config
        self.sock = sock
        self.inbox = _shm.Inbox()
        self.outbox = _shm.Outbox(inline_max=config.inline_max, name="tensorline-out",
                                  allocate=self._allocate, pickler_class=_shm.WorkerPickler)
        # Told the server it should be replaced (see ``_check_health``).
        self.unhealthy = False
        self._fd_dir = _open_fd_dir()

    def _check_health(self) -> None:
        """After each reply (off the caller's path): a worker close to running out of
        descriptors, or whose peak RSS passed the recycling threshold, says so (once), and the
        server retires it. A one-shot request the server sent before it read that is answered
        ``gone``, which sends the call to another worker, so the next call does not fail here.
        Two syscalls: ``fstat`` of ``/proc/self/fd`` counts open fds (``_open_fds``),
        ``getrusage`` has the peak RSS."""
        if self.unhealthy:
            return
        limits = self.config.limits
        fds = self._open_fds()
        reason = ""
        if fds > limits.nofile - FD_RESERVE:
            reason = f"{fds} of {limits.nofile} file descriptors in use"
        elif self.config.recycle_rss_mb:
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
            if peak_mb > self.config.recycle_rss_mb:
                reason = (f"peak RSS {peak_mb} MiB passed the recycling threshold of "
                          f"{self.config.recycle_rss_mb} MiB")
        if reason:
            self.unhealthy = True
            self._send(unhealthy_message(reason))

    def _open_fds(self) -> int:
        """How many descriptors are open. The size of ``/proc/self/fd`` is that count (Linux
        6.2+; a listing before). ``fstat`` of the directory opened once skips the path walk
        that a ``stat`` repeats after every reply (1.0 µs against 3.7 µs, measured outside the
        sandbox, where no Landlock hook runs on the walk). A descriptor a node closed or
        pointed elsewhere no longer names that directory: then the path is walked."""
        kept = self._fd_dir
        if kept is not None:
            fd, identity = kept
            try:
                status = os.fstat(fd)
            except OSError:
                pass
            else:
                if status.st_size and (status.st_dev, status.st_ino) == identity:
                    return status.st_size
        try:
            return os.stat("/proc/self/fd").st_size or len(os.listdir("/proc/self/fd"))
        except OSError:
            return self.config.limits.nofile  # no descriptor left even to list them

    def _reply(self, reply: tuple[Any, ...], health: bool = True) -> bool:
        """Send ``reply``, or the error that explains why it cannot be sent (False); then,
        unless told not to, check this worker's health."""
        message, fresh, sent = self._pack(reply)
        _shm.send(self.sock, message, fresh)
        if health and reply[0] != "ready":
            self._check_health()
        return sent is reply

    def _pack(self, reply: tuple[Any, ...],
              ) -> tuple[bytes, _shm.Segment | None, tuple[Any, ...]]:
        """``reply`` packed, or (when it cannot be) the error reply saying why; and which."""
        try:
            message, fresh = _shm.pack(reply, self.outbox, self.inbox.segment)
            return message, fresh, reply
        except (TypeError, ValueError, RecursionError) as exc:
            # Not a value that can leave the sandbox (a JSON value that is not JSON, NaN in
            # one, nested too deep): the node's error, not the protocol's.
            reply = error(NODE, type(exc).__name__, str(exc), _isolation.cpu_used(), PROCESS)
        except MemoryError as exc:
            reply = error(MEMORY, "MemoryError", str(exc), _isolation.cpu_used(), PROCESS)
        except OSError as exc:
            reply = error(classify(exc), type(exc).__name__,
                          f"the output could not be sent: {exc}", _isolation.cpu_used(), PROCESS)
        message, fresh = _shm.pack(reply, self.outbox)
        return message, fresh, reply

    def _send_values(self, values: list[Any]) -> bool:
        """(A ``runs`` batch.) The values of input sets that ran, in one reply; when that
        cannot be sent, one reply per value up to the one that cannot, whose error ends the
        batch (False), so that the failure names its own input set."""
        reply = (OK, values, _isolation.cpu_used_recent())
        message, fresh, packed = self._pack(reply)
        if packed is reply or len(values) == 1:
            _shm.send(self.sock, message, fresh)
            return packed is reply
        return all(self._reply((OK, [value], reply[2]), health=False) for value in values)

    def _allocate(self, size: int) -> _shm.Segment:
        """A reply segment of ``size`` bytes, made by the server (seccomp denies memfd_create
        here): ``("segment", size)`` is answered by ``SEGMENT_GRANTED`` with the fd and its
        size (at least ``size``: the server at least doubles each grant), or
        ``SEGMENT_REFUSED`` past the server's message limit."""
        self._send(segment_message(size))
        while True:
            try:
                data, fds = _shm.recv_raw(self.sock)
            except InterruptedError:
                continue
            break
        granted = granted_size(data)
        if granted is not None and granted >= size and len(fds) == 1:
            return _shm.Segment.adopt(fds[0], granted, verify=True)
        for fd in fds:
            os.close(fd)
        if data == SEGMENT_REFUSED:
            raise MemoryError(f"an output of {size} bytes exceeds the server's message limit")
        raise _ServerGone

    def _send(self, message: tuple[Any, ...]) -> None:
        packed, fresh = _shm.pack(message, self.outbox)
        _shm.send(self.sock, packed, fresh)

    def _receive(self) -> tuple[Any, ...]:
        """The server's next message of the stream (arrays copied: the segment is reused)."""
        message = self._next_message(copy=True)
        if message is None:
            raise _ServerGone
        _isolation.set_call_cpu_budget(self.config.limits.cpu_seconds)
        return message

    def _next_message(self, *, copy: bool) -> tuple[Any, ...] | None:
        """The server's next message, or None when it closed the socket. ``copy``: arrays own
        their memory instead of viewing the segment (which the next message reuses)."""
        while True:
            try:
                data, fds = _shm.recv_raw(self.sock)
            except InterruptedError:
                continue
            if not data:
                return None
            return _shm.unpack(data, fds, self.inbox, safe=False,  # type: ignore[no-any-return]
                               copy=copy)


def _open_fd_dir() -> tuple[int, tuple[int, int]] | None:
    """``/proc/self/fd`` opened, with its identity (device, inode); None when it cannot be, or
    when its size is not the count (before Linux 6.2: every check would then pay the ``fstat``
    before the listing)."""
    try:
        fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    status = os.fstat(fd)
    if not status.st_size:
        os.close(fd)
        return None
    return fd, (status.st_dev, status.st_ino)
