"""A node call that a stream session's producer started and its stage finishes.

A producer that hands a value to a parked stage runs the stage's node itself (``_session``,
"Running a node in its producer's task"). When the node's ``process`` suspends, or fails, or
returns something its stage must look at again, the call goes to the stage's own task as one of
these awaitables, so that the stage finishes it exactly as if it had started it.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from typing import Any


class Suspended:
    """A node's ``process`` that a producer started (see "Running a node in its producer's
    task") and that suspended: awaiting this continues the coroutine exactly where it stopped,
    as ``await coro`` would have (sent values, thrown exceptions and the return value pass
    through), so its stage task finishes it with the same timing, cancellation and errors."""

    __slots__ = ("_coro", "_pending", "started")

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any, started: float) -> None:
        self._coro = coro
        self._pending = pending  # what the coroutine yielded to the event loop when it stopped
        self.started = started

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, yielded = self._coro, self._pending
        while True:
            try:
                sent = yield yielded
            except BaseException as exc:  # a cancellation is the node's to handle, as usual
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as stop:
                    return stop.value

    def abandon(self) -> asyncio.Future[Any]:
        """Its stage stopped before awaiting it: cancel the call as a cancelled stage would (the
        node's ``except CancelledError``/``finally`` run; a sandbox call is cancelled in its
        worker). Returns what to wait for if the node awaits while it cancels."""
        try:
            yielded = self._coro.throw(asyncio.CancelledError())
        except BaseException:
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        self._pending = yielded
        return asyncio.ensure_future(self._rest())

    async def _rest(self) -> Any:
        return await self


@types.coroutine
def raising(error: BaseException) -> Generator[Any, Any, Any]:
    """An awaitable that raises ``error``: a failure the producer met, raised by the stage."""
    raise error
    yield  # a generator, so that it raises when awaited, not when created


@types.coroutine
def awaiting(awaitable: Any) -> Generator[Any, Any, Any]:
    """Any awaitable as a coroutine (a runtime whose ``process`` returns a future, say)."""
    return (yield from awaitable.__await__())


@types.coroutine
def returning(value: Any) -> Generator[Any, Any, Any]:
    """An awaitable that returns ``value`` at once."""
    return value
    yield  # a generator: see raising
