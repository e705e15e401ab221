"""Load shedding: bounded concurrent executions and streams. Beyond the bound a call is refused
at once with RESOURCE_EXHAUSTED and a retry hint, instead of queueing without limit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tensorline.server._errors import LimitExceeded


class Admission:
    def __init__(self, max_executions: int, max_streams: int, retry_after_s: float = 0.1) -> None:
        self.max_executions = max_executions
        self.max_streams = max_streams
        self.retry_after_s = retry_after_s
        self.executions = 0
        self.streams = 0

    @contextmanager
    def execution(self) -> Iterator[None]:
        if self.max_executions and self.executions >= self.max_executions:
            raise LimitExceeded(
                f"server busy: {self.executions} executions in progress (limit "
                f"{self.max_executions}); retry after {self.retry_after_s:g} s",
                retry_after_s=self.retry_after_s)
        self.executions += 1
        try:
            yield
        finally:
            self.executions -= 1

    @contextmanager
    def stream(self) -> Iterator[None]:
        if self.max_streams and self.streams >= self.max_streams:
            raise LimitExceeded(
                f"server busy: {self.streams} streams open (limit {self.max_streams}); "
                f"retry after {self.retry_after_s:g} s",
                retry_after_s=self.retry_after_s)
        self.streams += 1
        try:
            yield
        finally:
            self.streams -= 1
