"""Admission of executions and streams: load shedding and drain.

Beyond the configured bounds a call is refused at once with RESOURCE_EXHAUSTED and a retry
hint, instead of queueing without limit. While the server drains, new work is refused with
UNAVAILABLE (which clients retry on another replica) and ``wait_idle`` tells when the work in
flight has finished, so the gRPC server is stopped only once nothing is left to cancel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from tensorline.server._errors import LimitExceeded, ServiceUnavailable


class Admission:
    def __init__(self, max_executions: int, max_streams: int, retry_after_s: float = 0.1) -> None:
        self.max_executions = max_executions
        self.max_streams = max_streams
        self.retry_after_s = retry_after_s
        self.executions = 0
        self.streams = 0
        # Calls refused by the bounds (not by a drain), by kind, for the load-shed metric.
        self.shed = {"execution": 0, "stream": 0}
        self.draining = False
        self._idle: asyncio.Event | None = None

    def _admit(self, kind: str, in_flight: int, limit: int, what: str) -> None:
        """Raise when new work of ``kind`` must be refused: UNAVAILABLE while draining,
        RESOURCE_EXHAUSTED (counted as shed) at its limit."""
        if self.draining:
            raise ServiceUnavailable("server is draining; retry on another replica")
        if limit and in_flight >= limit:
            self.shed[kind] += 1
            raise LimitExceeded(
                f"server busy: {in_flight} {what} (limit {limit}); "
                f"retry after {self.retry_after_s:g} s", retry_after_s=self.retry_after_s)

    def _left(self) -> None:
        if self._idle is not None and self.executions == 0 and self.streams == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no execution or stream is in flight; False when ``timeout`` ran out."""
        if self.executions == 0 and self.streams == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def enter_execution(self) -> None:
        """Admit one unary execution (pair with ``leave_execution``); a plain method rather
        than a context manager because it runs on every call."""
        self._admit("execution", self.executions, self.max_executions, "executions in progress")
        self.executions += 1

    def leave_execution(self) -> None:
        self.executions -= 1
        if self._idle is not None:
            self._left()

    @contextmanager
    def stream(self) -> Iterator[None]:
        self._admit("stream", self.streams, self.max_streams, "streams open")
        self.streams += 1
        try:
            yield
        finally:
            self.streams -= 1
            self._left()
