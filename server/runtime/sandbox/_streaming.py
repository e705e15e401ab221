"""Streaming sessions: a streaming node's generator runs in its worker, driven step by step.

The worker asks for a chunk only when the generator pulls (``need``) and waits for the server's
go-ahead after each output (``out``, then ``next``): one output in flight at most. A session
holds its worker's turn from the first pull to the end, so a worker runs one stream or call at
a time. Each step has the node's deadline; waiting for input or for the consumer does not
count. Stopping a stream early sends a cancel (or SIGUSR1 while the node runs) and kills the
worker after ``cancel_grace_s``; ``NodeContext.report`` calls are forwarded to the session.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from tensorline.server.nodes import Emit
from tensorline.server.runtime.sandbox import _shm
from tensorline.server.runtime.sandbox._failures import WorkerFailure, _WorkerGone
from tensorline.server.runtime.sandbox._instances import SandboxInstance, _init_request, _Instances
from tensorline.server.runtime.sandbox._messages import (
    CANCEL_MESSAGE,
    END_MESSAGE,
    ERROR,
    NEED,
    NEXT_MESSAGE,
    OUT,
    PROCESS,
    chunk_message,
    stream_request,
)
from tensorline.server.runtime.sandbox._records import _Call, _Worker


class _Streaming(_Instances):
    """Stream sessions in a worker."""

    def _on_stream_message(self, worker: _Worker, call: _Call, message: tuple[Any, ...]) -> None:
        """A step of a stream ended (the generator pulls, or yielded): hand it to the session,
        or, once the session left, answer with a cancel."""
        if (message[0] == NEED and len(message) != 2) or (
                message[0] == OUT and (len(message) != 4 or not (
                    message[2] is None or type(message[2]) is int))):
            self._misbehaved(worker, f"malformed {message[0]!r} message")
            return
        if call.future.done() and not (call.abandoned and not call.cancel_sent):
            # Each step is one message each way: the worker waits for ours before its next
            # (else a worker could send steps nobody reads at the rate it likes).
            self._misbehaved(worker, f"{message[0]!r} out of turn")
            return
        with contextlib.suppress(TypeError, ValueError):
            worker.cpu_used = float(message[-1])
        if call.abandoned:
            call.cancel_sent = True
            self._send_stream(worker, call, CANCEL_MESSAGE)
            return
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        if not call.future.done():
            call.future.set_result(message)

    def _send_stream(self, worker: _Worker, call: _Call, message: tuple[Any, ...]) -> bool:
        """Send the session's next message to the worker; False when the worker is gone (or
        condemned: its kill's reason, not a failed send, is what the session reports)."""
        if call.finished or worker.sock is None or worker.killed:
            return False
        try:
            packed, fresh = _shm.pack(message, worker.outbox)
            _shm.send(worker.sock, packed, fresh)
        except OSError as exc:
            worker.kill(f"control channel failed ({exc})")
            return False
        return True

    async def _stream(self, instance: SandboxInstance,
                      chunks: AsyncIterator[Any]) -> AsyncGenerator[Any, None]:
        """Run a streaming node's generator in its worker (see ``_worker``'s ``stream``).

        The session holds its worker (its lock) from the first pull to the end: a worker runs
        one stream or call at a time. Each step (from our message to the worker's answer) has
        the node's deadline; waiting for input or for the consumer does not count.
        """
        spec = instance.spec
        if not instance.worker.alive:
            await self._recreate(instance)
        worker = instance.worker
        instance.unreserve()
        init = _init_request(instance)
        worker.queued += 1
        try:
            await worker.lock.acquire()
        except BaseException:
            worker.queued -= 1
            raise
        loop = asyncio.get_running_loop()
        report = instance.scope.extra.get("on_event")
        call = _Call(loop.create_future(), spec, "process", instance.iid,
                     self._deadline(spec, instance.scope, None), streaming=True)
        if report is not None:
            call.on_event = lambda kind, message, progress: report(
                spec.node_id, kind, message, progress)
        if not worker.alive or worker.sock is None:
            self._finish(worker, call)
            raise WorkerFailure(spec.node_id, worker.cause or "sandbox worker gone",
                                during="process", kind="crash")
        releases, worker.releases = worker.releases, []
        worker.inflight = call
        self._busy += 1
        our_turn = False  # True while the worker waits for our next message

        async def exchange(message: tuple[Any, ...]) -> tuple[Any, ...]:
            nonlocal our_turn
            if call.finished:
                raise self._death_error(call, worker.cause or worker.kill_reason
                                        or "sandbox worker gone")
            call.future = loop.create_future()
            call.deadline = self._deadline(spec, instance.scope, None)
            our_turn = False
            if not self._send_stream(worker, call, message):
                raise self._death_error(call, worker.cause or worker.kill_reason
                                        or "control channel failed")
            call.timer = loop.call_at(call.deadline, self._on_deadline, worker, call)
            reply = await call.future
            our_turn = call.streaming and not call.finished
            return reply

        try:
            reply = await exchange(stream_request(instance.iid, init, releases))
            # Created unless the worker failed before ``process`` (a need/out counts).
            if init is not None and (reply[0] != ERROR or reply[-1] == PROCESS):
                instance.initialized = True
            while True:
                if reply[0] == NEED:
                    try:
                        chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        reply = await exchange(END_MESSAGE)
                        continue
                    reply = await exchange(chunk_message(chunk.sequence, chunk.inputs))
                elif reply[0] == OUT:
                    _, value, sequence, _ = reply
                    yield value if sequence is None else Emit(value, sequence)
                    reply = await exchange(NEXT_MESSAGE)
                else:
                    try:
                        self._check_reply(worker, reply, spec, "process")
                    except _WorkerGone as exc:
                        raise WorkerFailure(spec.node_id, f"instance lost: {exc}",
                                            during="process", kind="crash") from None
                    return
        finally:
            call.on_event = None
            if not call.finished:
                # The session stopped early (aclose, cancel, an error of `chunks`): stop the
                # generator; the worker is killed if it does not end within the grace period.
                # Its final reply (or death) frees the worker, without holding the caller.
                if our_turn:
                    call.abandoned = True
                    call.cancel_sent = True
                    call.abandoned_at = self._now()
                    if self._send_stream(worker, call, CANCEL_MESSAGE):
                        # From now: the step deadline did not run while the worker waited.
                        call.timer = loop.call_at(self._now() + self.cancel_grace_s,
                                                  self._on_deadline, worker, call)
                    else:
                        worker.kill("control channel failed")
                else:
                    if not call.future.done():
                        call.future.cancel()
                    self._abandon(worker, call)
