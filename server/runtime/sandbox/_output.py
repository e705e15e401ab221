"""What sandbox workers print: read from their output pipes, logged as bounded, tagged lines.

A worker's stdout and stderr are one pipe that only the server reads (never the server's own
fds, which a node could otherwise write forged log lines to or truncate). Each line becomes one
log record naming the worker and the node it was running. A hostile node controls the content
and the volume, so lines are cut at ``MAX_LINE`` characters with control characters escaped
(no forged line breaks), and each worker has a line budget (a token bucket): past it lines are
dropped, counted, and the pipe is not read for a while, so a flood costs the server little CPU
and blocks only the flooding worker on its full pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

log = logging.getLogger("tensorline.sandbox.output")

MAX_LINE = 2000
_READ_SIZE = 65536
# Token bucket: a burst of BURST lines, then RATE lines a second.
BURST = 200
RATE = 50.0
# How long the pipe goes unread once the budget is spent.
_PAUSE_S = 1.0


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


class WorkerOutput:
    """Reads one worker's output pipe on the event loop until EOF or ``close``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, worker_id: int,
                 current_node: Callable[[], str | None]) -> None:
        self._loop = loop
        self._fd = fd
        self._worker_id = worker_id
        self._current_node = current_node
        self._partial = b""
        self._skipping = False  # inside an over-long line: drop until its end
        self._tokens = float(BURST)
        self._stamp = loop.time()
        self._dropped = 0
        self._paused: asyncio.TimerHandle | None = None
        self._report: asyncio.TimerHandle | None = None
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._flush_partial()
            self.close()
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if self._skipping:
                self._skipping = False
                continue
            self._emit(line)
        if len(self._partial) > MAX_LINE:
            if not self._skipping:
                self._emit(self._partial)
            self._partial = b""
            self._skipping = True
        if self._tokens < 1 and self._paused is None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._paused = self._loop.call_later(_PAUSE_S, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if self._fd >= 0:
            self._loop.add_reader(self._fd, self._on_readable)

    def _emit(self, raw: bytes) -> None:
        now = self._loop.time()
        self._tokens = min(float(BURST), self._tokens + (now - self._stamp) * RATE)
        self._stamp = now
        if self._tokens < 1:
            self._dropped += 1
            if self._report is None:
                # The count is logged a moment later, whether or not more output follows.
                self._report = self._loop.call_later(_PAUSE_S, self._report_dropped)
            return
        self._tokens -= 1
        text = _printable(raw[:MAX_LINE].decode("utf-8", "replace").rstrip("\r"))
        if len(raw) > MAX_LINE:
            text += " [truncated]"
        node = self._current_node()
        log.info("sandbox worker %d%s: %s", self._worker_id,
                 f" (node {_printable(node[:200])})" if node else "", text)

    def _report_dropped(self) -> None:
        self._report = None
        if self._dropped:
            log.warning("sandbox worker %d: %d output lines dropped (over %g lines/s)",
                        self._worker_id, self._dropped, RATE)
            self._dropped = 0

    def _flush_partial(self) -> None:
        if self._partial and not self._skipping:
            self._emit(self._partial)
        self._partial = b""

    def close(self) -> None:
        """Stop reading and close the pipe. Idempotent."""
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        if self._report is not None:
            self._report.cancel()
            self._report = None
        if self._fd >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        if self._dropped:
            log.warning("sandbox worker %d: %d output lines dropped", self._worker_id,
                        self._dropped)
            self._dropped = 0
