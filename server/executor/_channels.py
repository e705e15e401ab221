"""Bounded channels: a stage's inbox and a session's outbox (see ``_session`` for the whole shape).

Backpressure. Inboxes and the outbox are ``Channel``s bounded by a number of values
(``queue_size``) and by bytes (``buffer_bytes``; a value larger than that still passes alone so
nothing can wedge). A producer that finds a channel full waits; the wait propagates upstream to
the service's reader, which then stops reading, so gRPC flow control stops the client. Nothing
is dropped. ``BufferStats`` counts what a session's channels hold, and the peaks.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensorline.wire import Audio, Tagged

DEFAULT_QUEUE_SIZE = 16
DEFAULT_BUFFER_BYTES = 64 * 1024 * 1024
# Values one stage takes from its inbox per wake-up.
BATCH = 64


def size_of(value: Any) -> int:
    """Bytes a value holds (tensor data, audio samples, text/binary length)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, Audio):
        return int(value.samples.nbytes)
    if isinstance(value, Tagged):
        return size_of(value.value)
    if isinstance(value, bytes | str):
        return len(value)
    return 0


@dataclass(slots=True)
class BufferStats:
    """Values currently held in a session's channels, and their peaks."""

    items: int = 0
    bytes: int = 0
    max_items: int = 0
    max_bytes: int = 0


class Channel:
    """A bounded FIFO with one consumer: ``put`` waits while full, ``get_batch`` takes all."""

    __slots__ = ("_bytes", "_getter", "_items", "_putters", "_stats", "capacity", "closed",
                 "max_bytes")

    def __init__(self, capacity: int, max_bytes: int, stats: BufferStats) -> None:
        self.capacity = max(1, capacity)
        self.max_bytes = max_bytes
        self._items: deque[tuple[Any, int]] = deque()
        self._bytes = 0
        self._getter: asyncio.Future[None] | None = None
        self._putters: list[asyncio.Future[None]] = []
        self._stats = stats
        # A closed channel (its consumer stopped) takes and drops whatever is put.
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def _full(self, size: int) -> bool:
        if self.closed:
            return False
        count = len(self._items)
        if count >= self.capacity:
            return True
        # An oversized value still passes into an empty channel: bounded, never wedged.
        return bool(self.max_bytes and count and self._bytes + size > self.max_bytes)

    def _append(self, item: Any, size: int) -> None:
        if self.closed:
            return
        self._items.append((item, size))
        self._bytes += size
        stats = self._stats
        stats.items += 1
        stats.bytes += size
        if stats.items > stats.max_items:
            stats.max_items = stats.items
        if stats.bytes > stats.max_bytes:
            stats.max_bytes = stats.bytes
        getter = self._getter
        if getter is not None:
            self._getter = None
            if not getter.done():
                getter.set_result(None)

    def try_put(self, item: Any, size: int = 0) -> bool:
        """Queue ``item`` if there is room now (the hot path: no coroutine, no future)."""
        if self._full(size):
            return False
        self._append(item, size)
        return True

    async def put(self, item: Any, size: int = 0) -> None:
        loop = asyncio.get_running_loop()
        while self._full(size):
            waiter: asyncio.Future[None] = loop.create_future()
            self._putters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._putters:
                    self._putters.remove(waiter)
        self._append(item, size)

    def force_put(self, item: Any) -> None:
        """Queue a control item (end of stream, event) regardless of the bounds."""
        self._append(item, 0)

    def close(self) -> None:
        """Drop what is queued and everything put from now on; release waiting producers."""
        self.closed = True
        self._stats.items -= len(self._items)
        self._stats.bytes -= self._bytes
        self._items.clear()
        self._bytes = 0
        for waiter in self._putters:
            if not waiter.done():
                waiter.set_result(None)
        self._putters.clear()

    async def get_batch(self, limit: int = BATCH) -> list[Any]:
        """Up to ``limit`` queued items, oldest first (waits while there are none)."""
        await self._ready()
        return self._take(limit, sized=False)

    async def get_sized_batch(self, limit: int = BATCH) -> list[tuple[Any, int]]:
        """As ``get_batch``, each item with the size it was put with (so a consumer that needs
        it does not compute it again)."""
        await self._ready()
        return self._take(limit, sized=True)

    async def _ready(self) -> None:
        while not self._items:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._getter = waiter
            try:
                await waiter
            finally:
                self._getter = None

    def _take(self, limit: int, *, sized: bool) -> list[Any]:
        items = self._items
        count = min(limit, len(items))
        out: list[Any] = []
        freed = 0
        for _ in range(count):
            pair = items.popleft()
            freed += pair[1]
            out.append(pair if sized else pair[0])
        self._bytes -= freed
        self._stats.items -= count
        self._stats.bytes -= freed
        if self._putters:
            for waiter in self._putters:
                if not waiter.done():
                    waiter.set_result(None)
            self._putters.clear()
        return out
