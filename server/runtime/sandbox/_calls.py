"""The call path: one request to a worker and its reply.

``_send`` packs a request (piggybacking the cleanups released since the last one) onto the
worker's control socket; the socket's reader callback (``_on_readable``, ``_on_message``) reads
one message per wake-up and resolves the waiting future right there (the usual ``ok`` reply is
checked first). ``_finish`` frees the worker and, when the longest waiter is a one-shot call it
can serve, ``_dispatch`` sends that call's request from the same callback. Every call has a
wall-clock deadline, enforced by one watchdog timer per worker (``_watch``); past it the worker
is killed; a cancelled caller abandons its call (SIGUSR1, then a kill after ``cancel_grace_s``).
``_check_reply`` turns a reply into the node's value or the right exception. One-shot nodes
(``_ClassPlan.oneshot``, computed once per class by ``_class_plan``) take the ``run`` request:
one round trip creates, runs and drops the instance, naming its class by a per-worker id.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from tensorline.server._errors import DeadlineExceeded, NodeFailed
from tensorline.server.manifest import NodeSpec
from tensorline.server.nodes import NodeEntry
from tensorline.server.runtime._base import BatchOutcome, ExecutionScope
from tensorline.server.runtime.sandbox import _placement, _shm
from tensorline.server.runtime.sandbox._failures import WorkerFailure, _WorkerGone
from tensorline.server.runtime.sandbox._messages import (
    BATCH_FLUSH_S,
    CARRIES_RELEASES,
    CHATTER_BURST,
    CHATTER_PAUSE_S,
    CHATTER_RATE,
    ERROR,
    EVENT,
    EXIT,
    GONE,
    IMPORT,
    INITIALIZE,
    LIMIT,
    LOADED,
    MAX_CLASS_IDS,
    MEMORY,
    NEED,
    NODE,
    OK,
    OUT,
    PERMISSION,
    PROCESS,
    READY,
    RELEASE,
    RUN,
    RUNS,
    RUNS_NODE_CODE,
    SEGMENT,
    SEGMENT_REFUSED,
    TIMED,
    UNHEALTHY,
    error_fields,
    granted_message,
    reached_process,
    with_releases,
)
from tensorline.server.runtime.sandbox._pool import _expire, _Pool
from tensorline.server.runtime.sandbox._records import (
    _NO_SPEC,
    MIN_MEMORY_MB,
    _Batch,
    _Call,
    _ClassKey,
    _ClassPlan,
    _Group,
    _Started,
    _Worker,
)


class _Calls(_Pool):
    """Requests and replies, deadlines and cancellation, one-shot ``run`` requests."""

    # --- replies ------------------------------------------------------------------------------

    def _on_readable(self, worker: _Worker) -> None:
        # One message per callback: the selector is level-triggered, so a second queued message
        # calls back again, and the usual single reply saves a recvmsg that would only fail.
        sock = worker.sock
        if sock is None or worker.state == "dead":
            return
        if worker.killed:
            # Nothing a worker sent after it was condemned counts (a reply queued behind the
            # message that broke the protocol must not complete the call): its death does.
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            worker.eof = True
            return
        try:
            data, fds = _shm.recv_raw(sock)
        except (BlockingIOError, InterruptedError):
            return
        except _shm.ProtocolError as exc:
            self._misbehaved(worker, str(exc))
            return
        except OSError:
            data, fds = b"", []
        if not data:
            self._on_eof(worker)
            return
        try:
            message = _shm.unpack(data, fds, worker.inbox, safe=True, copy=True,
                                  max_segment=self.max_message_bytes * 2,
                                  echo=worker.outbox.segment)
        except Exception as exc:
            self._misbehaved(worker, f"undecodable message ({exc})")
            return
        self._on_message(worker, message)

    def _on_message(self, worker: _Worker, message: Any) -> None:
        call = worker.inflight
        if (type(message) is tuple and len(message) == 3 and message[0] == OK
                and type(message[2]) is float and call is not None and not call.streaming):
            # The usual reply, checked first: ("ok", value, cpu_used) to a call.
            worker.cpu_used = message[2]
            batch = call.batch
            if batch is not None:
                values = message[1]
                ran = len(batch.values) + len(values) if type(values) is list else -1
                # A report runs at least one input set and no more than the batch has; an
                # empty one ends the batch (the rest is handed back), after at least one.
                if not (0 < ran <= batch.size and (values or batch.values)):
                    self._misbehaved(worker, "malformed batch reply")
                    return
                if values and ran < batch.size:
                    # Input sets of a batch ran: the next has a deadline of its own from now
                    # (the watchdog finds it moved when it fires).
                    worker.calls += len(values)
                    batch.values += values
                    call.deadline = self._batch_deadline(call.spec, batch.scope)
                    if batch.on_report is not None:
                        batch.on_report(values)
                    return
                worker.calls += len(values) - 1  # the last report's; _finish counts one
            self._finish(worker, call)
            if not call.future.done():
                call.future.set_result(message)
            elif call.on_abandoned is not None:
                call.on_abandoned(message)
            return
        if not isinstance(message, tuple) or not message or not isinstance(message[0], str):
            self._misbehaved(worker, "malformed reply")
            return
        if message[0] == READY and worker.state == "starting":
            try:
                worker.layers = [(str(n), bool(a), str(d)) for n, a, d in message[1]]
            except (TypeError, ValueError, IndexError):
                self._misbehaved(worker, "malformed ready message")
                return
            worker.state = "ready"
            self._record_layers(worker)
            if worker.ready is not None and not worker.ready.done():
                worker.ready.set_result(None)
            self._notify(everyone=True)
            return
        if message[0] == UNHEALTHY and len(message) == 2:
            _, reason = message
            self._recycle(worker, str(reason)[:300])
            return
        if message[0] == LOADED and len(message) == 1:
            if call is None:
                self._misbehaved(worker, "a class loaded without a request")
                return
            self._charge(worker)
            worker.loaded = True
            return
        if message[0] == SEGMENT and len(message) == 2 and type(message[1]) is int:
            # A worker needs a larger segment only for the reply it owes.
            if call is None:
                self._misbehaved(worker, "segment request without a request")
                return
            self._charge(worker)
            _, size = message
            self._grant_segment(worker, size)
            return
        if message[0] == EVENT:
            # NodeContext.report during a stream (and only then: the worker sends none once
            # the stream's generator is closed); dropped when nobody listens any more.
            if call is None or not call.streaming:
                self._misbehaved(worker, "event outside a stream")
                return
            self._charge(worker)
            if call.on_event is not None and len(message) == 4:
                _, kind, text, progress = message
                with contextlib.suppress(Exception):
                    call.on_event(str(kind)[:100], str(text)[:4000], float(progress))
            return
        if call is None:
            self._misbehaved(worker, "reply without a request")
            return
        if call.streaming and message[0] in (NEED, OUT):
            self._on_stream_message(worker, call, message)
            return
        # The CPU reading: last in an "ok" reply, before ``during`` in an "error" one.
        cpu = message[4] if message[0] == ERROR and len(message) == 6 else message[-1]
        if len(message) >= 3 and isinstance(cpu, float | int) and not isinstance(cpu, bool):
            worker.cpu_used = float(cpu)
        self._finish(worker, call)
        if not call.future.done():
            call.future.set_result(message)
        elif call.on_abandoned is not None:
            call.on_abandoned(message)

    def _charge(self, worker: _Worker) -> None:
        """One message beyond a reply from ``worker``: charged to its budget; once that is
        spent its socket goes unread for ``CHATTER_PAUSE_S`` (a flood of events or segment
        requests would otherwise hold the event loop every other call needs)."""
        now = self._now()
        worker.chatter = min(float(CHATTER_BURST),
                             worker.chatter + (now - worker.chatter_at) * CHATTER_RATE) - 1
        worker.chatter_at = now
        loop = self._loop
        if worker.chatter < 0 and worker.paused is None and worker.sock is not None and loop:
            loop.remove_reader(worker.sock.fileno())
            worker.paused = loop.call_later(CHATTER_PAUSE_S, self._read_again, worker)

    def _read_again(self, worker: _Worker) -> None:
        worker.paused = None
        if (worker.sock is not None and self._loop is not None and not worker.eof
                and not worker.killed and worker.state != "dead"):
            self._loop.add_reader(worker.sock.fileno(), self._on_readable, worker)

    def _grant_segment(self, worker: _Worker, size: int) -> None:
        """A worker's reply needs a larger segment; it may not make memfds itself. Each grant
        at least doubles the last one (up to the limit), whatever the worker asked for, and
        the reply says the size it got: a worker keeps the fds of earlier grants and can write
        into them unmapped (memory no rlimit counts), so the grants must add up to less than
        twice the largest (asked for in steps of 1 MiB, they were hundreds of segments of up to
        the limit each). An honest worker's segment is the last one granted, and it asks for
        more than that holds: one asking for no more has kept earlier grants, and is killed."""
        sock = worker.sock
        if sock is None:
            return
        if size <= worker.granted:
            self._misbehaved(worker, "asked for a segment no larger than one it was granted")
            return
        limit = self.max_message_bytes * 2
        if size > limit:
            with contextlib.suppress(OSError):
                sock.send(SEGMENT_REFUSED)
            return
        size = max(size, min(worker.granted * 2, limit))
        worker.granted = size
        fd = _shm.new_segment_fd(size, f"tensorline-w{worker.wid}-out")
        try:
            sock.sendmsg([granted_message(size)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                    array.array("i", [fd]))])
        except OSError as exc:
            self._misbehaved(worker, f"segment could not be sent ({exc})")
        finally:
            os.close(fd)

    def _death_error(self, call: _Call, cause: str) -> Exception:
        if call.deadline_hit:
            return DeadlineExceeded(
                f"node '{call.spec.node_id}' ({call.spec.node_type}) exceeded its deadline "
                f"during {call.during} in the sandbox; its worker was killed and replaced"
            )
        kind = "cpu" if "SIGXCPU" in cause else "crash"
        if cause.startswith("worker broke the control protocol"):
            kind = "protocol"
        return WorkerFailure(call.spec.node_id, cause, during=call.during, kind=kind)

    # --- class plans --------------------------------------------------------------------------

    def _group_of(self, spec: NodeSpec) -> _Group:
        return self._class_plan(spec.entry).group

    def _class_plan(self, entry: NodeEntry) -> _ClassPlan:
        plan = self._class_plans.get(entry.class_ref)
        if plan is None or plan.entry is not entry:
            declared = entry.traits.memory_mb
            cap = max(int(declared), MIN_MEMORY_MB) if declared else self.memory_mb_default
            # A streaming class's unary call is one process call like any other's; its
            # sessions, which need a worker of their own, are kept off this path (``acquire``).
            lazy = not (entry.reusable or entry.has_initialize)
            plan = self._class_plans[entry.class_ref] = _ClassPlan(
                entry=entry, group=(cap, "" if entry.trusted else entry.module),
                module=entry.class_module, lazy=lazy, oneshot=lazy and not entry.has_cleanup)
        return plan

    # --- calls --------------------------------------------------------------------------------

    def _deadline(self, spec: NodeSpec, scope: ExecutionScope, default: float | None) -> float:
        """Absolute loop time a call must finish by: the execution's deadline, and the node's
        timeout (``default=None``: for ``process``) or ``default`` seconds (initialize)."""
        if default is None:
            limit = spec.timeout_s or spec.entry.traits.timeout_s or self.call_timeout_s
        else:
            limit = default
        deadline = self._now() + limit
        if scope.deadline is not None:
            deadline = min(deadline, scope.deadline)
        return deadline

    def _batch_deadline(self, spec: NodeSpec, scope: ExecutionScope) -> float:
        """The deadline of a batch's next input set, from now: a call's, plus ``BATCH_FLUSH_S``,
        since the worker reports what ran that much later at most (so the input set running at
        a call's deadline has had its due before the watchdog fires)."""
        return self._deadline(spec, scope, None) + BATCH_FLUSH_S

    async def _request(self, worker: _Worker, request: tuple[Any, ...], spec: NodeSpec | None,
                       during: str, iid: int, deadline: float,
                       on_abandoned: Callable[[tuple[Any, ...]], None] | None = None,
                       batch: _Batch | None = None) -> tuple[Any, ...]:
        """Send one request to ``worker`` and await its (last) reply (calls are serialized).

        The worker's lock is held until the worker has answered (or died), even when the caller
        is cancelled first: ``_finish`` releases it, from the reply or death callbacks.
        """
        worker.queued += 1
        if not worker.lock.try_acquire():
            try:
                await worker.lock.acquire()
            except BaseException:
                worker.queued -= 1
                raise
        sent = self._send(worker, request, spec, during, iid, deadline, on_abandoned, batch)
        if isinstance(sent, tuple):
            return sent
        return await self._reply(worker, sent, on_abandoned)

    def _send(self, worker: _Worker, request: tuple[Any, ...], spec: NodeSpec | None,
              during: str, iid: int, deadline: float,
              on_abandoned: Callable[[tuple[Any, ...]], None] | None,
              batch: _Batch | None = None) -> _Call | tuple[Any, ...]:
        """(The caller counted itself in ``queued`` and holds the worker's turn.) Send
        ``request``: the call in flight, or the reply itself when there was nothing to send."""
        loop = self._loop
        assert loop is not None
        call = _Call(loop.create_future(), spec if spec is not None else _NO_SPEC, during, iid,
                     deadline, on_abandoned=on_abandoned, batch=batch)
        op = request[0]
        if not worker.alive or worker.sock is None or worker.killed or (
                worker.exiting and op != EXIT):
            self._finish(worker, call)
            raise _WorkerGone(worker.cause or worker.kill_reason or "worker gone")
        if op == EXIT:
            # Whatever comes after this would reach a worker that has left its loop.
            worker.exiting = True
        # Whether the worker may still be taken at its word on an import failure (see
        # ``_check_reply``).
        worker.untouched = not worker.ran_node_code
        worker.loaded = False
        if op in RUNS_NODE_CODE:
            worker.ran_node_code = True
        if op in CARRIES_RELEASES:
            # Piggyback the cleanups released since the last request (the last field, None
            # when there are none).
            if worker.releases:
                releases, worker.releases = worker.releases, []
                request = with_releases(request, releases)
            elif op == RELEASE:
                self._finish(worker, call)
                return (OK, None, worker.cpu_used)
        try:
            message, fresh = _shm.pack(request, worker.outbox)
        except BaseException:
            self._finish(worker, call)
            raise
        now = loop.time()
        timed = op in TIMED
        if timed:
            # Its duration tells the placement and the gathering whether the node's calls are
            # short.
            call.sent_at = now
        if self._busy:
            self._overlapped_at = now
        placement = self._placement
        if placement.enabled and worker.process_id is not None and placement.before_send(
                worker.process_id, timed and placement.is_short(call.spec.node_type),
                self._busy > 0, now):
            call.overrun = loop.call_at(now + _placement.SHORT_S, self._overran, worker, call)
            call.bound_at = now
        worker.inflight = call
        self._busy += 1
        if batch is not None:
            self._batches += 1
            self._batched_inputs += batch.size
        try:
            _shm.send(worker.sock, message, fresh)
        except OSError as exc:
            self._finish(worker, call)
            worker.kill(f"control channel failed ({exc})")
            raise _WorkerGone(f"control channel failed ({exc})") from None
        self._watch(worker, deadline)
        return call

    async def _reply(self, worker: _Worker, call: _Call,
                     on_abandoned: Callable[[tuple[Any, ...]], None] | None) -> tuple[Any, ...]:
        """Await the reply to ``call``; a cancelled caller abandons it (see ``_abandon``)."""
        try:
            return await call.future
        except asyncio.CancelledError:
            if not call.finished:
                self._abandon(worker, call)
            elif call.future.done() and not call.future.cancelled() and (
                    call.future.exception() is None and on_abandoned is not None):
                on_abandoned(call.future.result())
            raise

    def _finish(self, worker: _Worker, call: _Call) -> None:
        """The worker is done with ``call`` (answered or died): free it for the next one."""
        if call.finished:
            return
        call.finished = True
        if call.timer is not None:
            call.timer.cancel()
        if worker.inflight is call:
            worker.inflight = None
            self._busy -= 1
        worker.queued -= 1
        if self._loop is not None:
            worker.last_used = self._loop.time()
            if call.overrun is not None:
                call.overrun.cancel()
                self._placement.bound_request_ended(worker.last_used - call.bound_at)
            if call.sent_at:
                self._placement.record(call.spec.node_type, worker.last_used - call.sent_at)
        worker.calls += 1
        if self.max_calls and worker.calls >= self.max_calls:
            self._recycle(worker, f"served {worker.calls} calls")
        worker.lock.release()
        if worker.queued == 0 and not self._dispatch(worker):
            self._notify(worker.group)

    def _watch(self, worker: _Worker, deadline: float) -> None:
        """Make the worker's watchdog fire by ``deadline``. One timer serves call after call:
        re-armed only when a call's deadline comes before it (a new timer plus a cancelled one
        per call cost more than the call's own bookkeeping)."""
        timer = worker.watchdog
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            assert self._loop is not None
            worker.watchdog = self._loop.call_at(deadline, self._on_watchdog, worker)

    def _on_watchdog(self, worker: _Worker) -> None:
        worker.watchdog = None
        call = worker.inflight
        # Streaming sessions have timers of their own (waiting for the consumer does not count).
        if call is None or call.finished or call.streaming:
            return
        if call.deadline <= self._now():
            self._on_deadline(worker, call)
        else:
            self._watch(worker, call.deadline)

    def _overran(self, worker: _Worker, call: _Call) -> None:
        if worker.inflight is call:
            self._placement.overran(call.spec.node_type if call.sent_at else None)

    def _on_deadline(self, worker: _Worker, call: _Call) -> None:
        if worker.inflight is not call:
            return
        if call.abandoned:
            # Say what happened: the grace ran out, or the call's own deadline came first (a
            # client deadline cancels the call and kills it at once, not 5 s later).
            after = self._now() - call.abandoned_at
            if after >= self.cancel_grace_s - 0.01:
                worker.kill(f"did not stop within {self.cancel_grace_s:g} s of being cancelled")
            else:
                worker.kill(f"deadline reached {after * 1000:.0f} ms after the call was "
                            "cancelled, still running")
        else:
            call.deadline_hit = True
            worker.kill("deadline exceeded")

    def _abandon(self, worker: _Worker, call: _Call) -> None:
        """The caller went away: ask the worker to stop, kill it if it does not in time."""
        call.abandoned = True
        call.abandoned_at = self._now()
        worker.signal(signal.SIGUSR1)
        assert self._loop is not None
        if call.timer is not None:
            call.timer.cancel()
        when = min(call.deadline, self._now() + self.cancel_grace_s)
        call.timer = self._loop.call_at(when, self._on_deadline, worker, call)

    def _check_reply(self, worker: _Worker, reply: tuple[Any, ...], spec: NodeSpec,
                     during: str) -> Any:
        status = reply[0]
        if status == OK and len(reply) == 3:
            if worker.cpu_used > self.cpu_seconds_lifetime - self.cpu_seconds * 2:
                self._retire(worker, "close to its lifetime CPU limit")
            return reply[1]
        if status != ERROR or len(reply) != 6 or reply[5] not in (INITIALIZE, PROCESS):
            self._misbehaved(worker, f"unexpected reply {status!r}")
            raise WorkerFailure(spec.node_id, "worker broke the control protocol", during=during,
                                kind="protocol")
        asked = during  # what the request was for; the reply says where the worker failed
        kind, exc_type, message, during = error_fields(reply)
        # Whatever the worker says goes into statuses and logs: keep it bounded.
        exc_type, message = str(exc_type)[:200], str(message)[:4000]
        if kind == NODE:
            raise NodeFailed(spec.node_id, exc_type, message)
        if kind == MEMORY:
            self._retire(worker, "MemoryError")
            raise WorkerFailure(
                spec.node_id, f"memory limit {worker.cap_mb} MiB exceeded ({exc_type}: {message})",
                during=during, kind="memory")
        if kind == PERMISSION:
            raise WorkerFailure(spec.node_id, f"blocked by the sandbox: {exc_type}: {message}",
                                during=during, kind="permission")
        if kind == LIMIT:
            raise WorkerFailure(spec.node_id, f"a sandbox limit was hit: {exc_type}: {message}",
                                during=during, kind="limit")
        if kind == IMPORT:
            self._check_import_failure(worker, spec, asked)
            raise WorkerFailure(spec.node_id, f"{exc_type}: {message}", during="initialize",
                                kind="import")
        if kind == GONE:
            raise _WorkerGone(message)
        self._misbehaved(worker, f"unknown error kind {kind!r}")
        raise WorkerFailure(spec.node_id, "worker broke the control protocol", during=during,
                            kind="protocol")

    def _check_import_failure(self, worker: _Worker, spec: NodeSpec, asked: str) -> None:
        """Whether a worker's "I cannot load this class" may stand: it sends a trusted node
        back to the server (the fallback), so a worker taken over by the inputs it was given
        would say it to have the next call's inputs run there. Taken only in answer to an
        ``init`` (a class is loaded nowhere else: the others need its module loaded), from a
        worker that had run no node code before and did not say it loaded the class meanwhile.
        Otherwise a worker that loaded the class and then denied it is killed, and one that
        ran node code before is retired and ``_WorkerGone`` raised: the caller asks a fresh
        worker, whose word counts."""
        if asked != "initialize" or worker.loaded:
            self._misbehaved(worker, "an import failure for a class it had loaded")
            raise WorkerFailure(spec.node_id, "worker broke the control protocol",
                                during=asked, kind="protocol")
        if not worker.untouched:
            self._retire(worker, "an import failure after node code ran in it: a fresh worker "
                                 "is asked instead")
            raise _WorkerGone("import failure not taken from a worker that ran node code")

    # --- one-shot run requests ----------------------------------------------------------------

    async def _wait_for_run(self, plan: _ClassPlan, spec: NodeSpec, scope: ExecutionScope,
                            inputs: Mapping[str, Any] | list[Mapping[str, Any]],
                            again: bool = False) -> _Started | None:
        """Wait for an idle worker like ``_pool_change`` (in the caller's line, round robin
        with the other callers; bounded by the call's deadline: then ``LimitExceeded``). The
        reply callback that frees a worker sends this call's request at once when its turn has
        come (``_dispatch``): then the call in flight is returned; None means "look again"."""
        loop = self._loop
        assert loop is not None
        waiter: asyncio.Future[Any] = loop.create_future()
        self._line(plan.group).add(scope.caller or scope.execution_id, waiter, again)
        self._runs[waiter] = (plan, spec, scope, inputs)
        began = loop.time()
        timer = loop.call_at(self._wait_deadline(self._deadline(spec, scope, None)), _expire,
                             waiter, lambda: self._exhausted(spec, plan.group,
                                                             loop.time() - began,
                                                             "every worker stayed busy"))
        try:
            started: _Started | None = await waiter
            return started
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                if waiter.result() is None:
                    self._notify(plan.group)  # pass on the wake-up this cancelled waiter consumed
                else:
                    worker, call = waiter.result()[:2]
                    if not call.finished:
                        self._abandon(worker, call)
            raise
        finally:
            timer.cancel()
            self._runs.pop(waiter, None)
            if not waiter.done():
                waiter.cancel()

    def _dispatch(self, worker: _Worker) -> bool:
        """``worker`` just became idle: when the waiter whose turn it is is a one-shot call it
        can serve, send that call's request now, from the callback that freed the worker (no
        loop iteration for the waiter to wake up in, and the worker gets its next request
        before it goes back to sleep), and hand the waiter the call in flight. False: nothing
        sent."""
        line = self._waiters.get(worker.group)
        if line is None:
            return False
        waiter = line.first()
        if waiter is None:
            return False
        run = self._runs.get(waiter)
        if run is None:
            return False
        plan, spec, scope, inputs = run
        cap, domain = plan.group
        if (worker.state != "ready" or worker.killed or worker.reserved
                or worker.cap_mb != cap or worker.domain != domain
                or plan.module not in worker.modules or worker.dedicated
                or not worker.lock.try_acquire()):
            return False
        line.pop()
        del self._runs[waiter]
        worker.queued += 1
        request, key, class_id, define = self._run_request(worker, spec, scope, inputs)
        try:
            batch = _batch_of(inputs, scope)
            deadline = (self._deadline(spec, scope, None) if batch is None
                        else self._batch_deadline(spec, scope))
            sent = self._send(worker, request, spec, "process", 0, deadline, None, batch)
        except Exception as exc:  # _WorkerGone, or inputs that cannot be sent: the caller's
            waiter.set_exception(exc)
            return True
        assert not isinstance(sent, tuple)
        waiter.set_result((worker, sent, key, class_id, define))
        return True

    async def _run_dispatched(self, started: _Started, spec: NodeSpec) -> Any:
        worker, call, key, class_id, define = started
        reply = await self._reply(worker, call, None)
        return self._run_reply(worker, spec, reply, key, class_id, define)

    def _serving(self, plan: _ClassPlan) -> bool:
        """A ready worker of the class's group has imported its module and is not owned by a
        streaming session: once it is idle, ``_run_once`` can use it."""
        cap, domain = plan.group
        for w in self._workers.values():
            if (w.state == "ready" and not w.killed and w.cap_mb == cap and w.domain == domain
                    and plan.module in w.modules and not w.dedicated):
                return True
        return False

    async def _run_once(self, worker: _Worker, spec: NodeSpec, scope: ExecutionScope,
                        inputs: Mapping[str, Any]) -> Any:
        """Run a one-shot node (``_ClassPlan.oneshot``) on ``worker`` (idle, its module
        imported): one ``run`` request creates the instance, runs ``process`` and drops it, so
        nothing is pinned, reserved or released. The class and params travel once per worker:
        the first request names them with a new id (``class_ids``), later ones send the id only. A
        worker that does not know an id (replaced workers start empty; a worker drops ids past
        its bound) answers ``gone``: the id is forgotten and ``_WorkerGone`` sends the caller
        down the general path, which creates the instance from scratch."""
        request, key, class_id, define = self._run_request(worker, spec, scope, inputs)
        reply = await self._request(worker, request, spec, "process", 0,
                                    self._deadline(spec, scope, None))
        return self._run_reply(worker, spec, reply, key, class_id, define)

    async def _run_batch_once(self, worker: _Worker, spec: NodeSpec, scope: ExecutionScope,
                              batch: list[Mapping[str, Any]]) -> BatchOutcome:
        """``_run_once`` for several input sets in one ``runs`` request. A ``_WorkerGone``
        failure means nothing ran (the worker did not know the class, or is being replaced):
        the batch is safe to send elsewhere."""
        request, key, class_id, define = self._run_request(worker, spec, scope, batch)
        tracked = _batch_of(batch, scope)
        assert tracked is not None
        reply = self._request(worker, request, spec, "process", 0,
                              self._batch_deadline(spec, scope), batch=tracked)
        return await self._batch_result(
            worker, spec, tracked, reply,
            lambda answer: self._run_reply(worker, spec, answer, key, class_id, define))

    async def _run_batch_dispatched(self, started: _Started, spec: NodeSpec) -> BatchOutcome:
        """``_run_batch_once`` for a batch ``_dispatch`` sent."""
        worker, call, key, class_id, define = started
        assert call.batch is not None
        return await self._batch_result(
            worker, spec, call.batch, self._reply(worker, call, None),
            lambda answer: self._run_reply(worker, spec, answer, key, class_id, define))

    async def _batch_result(self, worker: _Worker, spec: NodeSpec, tracked: _Batch,
                            reply: Coroutine[Any, Any, tuple[Any, ...]],
                            check: Callable[[tuple[Any, ...]], Any]) -> BatchOutcome:
        """What a batch came to, from its last reply (``check`` turns it into the values it
        carries, or raises the failure it reports). Fewer values than input sets and no
        failure: the worker's turn ended first, the rest did not run."""
        try:
            answer = await reply
        except Exception as exc:
            # The worker died (or never got the request): what ran since its last report, and
            # which input set it was running, died with it.
            return BatchOutcome(tracked.values, exc, tracked.size - len(tracked.values))
        try:
            last = check(answer)
        except Exception as exc:
            return BatchOutcome(tracked.values, exc)
        if type(last) is not list or len(tracked.values) + len(last) > tracked.size or not (
                tracked.values or last):
            self._misbehaved(worker, "malformed batch reply")
            return BatchOutcome(tracked.values, WorkerFailure(
                spec.node_id, "worker broke the control protocol", during="process",
                kind="protocol"), tracked.size - len(tracked.values))
        tracked.values += last
        return BatchOutcome(tracked.values, None)

    def _run_request(self, worker: _Worker, spec: NodeSpec, scope: ExecutionScope,
                     inputs: Mapping[str, Any] | list[Mapping[str, Any]],
                     ) -> tuple[tuple[Any, ...], _ClassKey, int, tuple[str, str, str] | None]:
        """The ``run`` request for ``worker`` (``runs`` for a list of input sets): with the
        class id it knows, else a new one and the class's definition."""
        key = (spec.entry.class_ref, spec.params_key)
        class_id = worker.class_ids.get(key)
        define: tuple[str, str, str] | None = None
        if class_id is None:
            class_id = next(self._class_ids)
            define = (*spec.entry.class_ref, spec.params_key)
        request: tuple[Any, ...]
        if isinstance(inputs, list):  # a batch: one "runs" request
            # Input sets of several calls (``_gather``) each name their own node and execution.
            contexts = scope.extra.get(PER_INPUT_CONTEXTS)
            node_ids, execution_ids = ((spec.node_id, scope.execution_id) if contexts is None
                                       else ([c[0] for c in contexts], [c[1] for c in contexts]))
            request = (RUNS, class_id, [i if type(i) is dict else dict(i) for i in inputs],
                       node_ids, execution_ids, define, None)
        else:
            request = (RUN, class_id, inputs if type(inputs) is dict else dict(inputs),
                       spec.node_id, scope.execution_id, define, None)
        return request, key, class_id, define

    def _run_reply(self, worker: _Worker, spec: NodeSpec, reply: tuple[Any, ...],
                   key: _ClassKey, class_id: int, define: tuple[str, str, str] | None) -> Any:
        if reply[0] == ERROR and reply[1] == GONE:  # is_gone(reply), inline: per request
            worker.class_ids.pop(key, None)
        elif define is not None and reached_process(reply):
            # The worker created the instance, so it holds the id.
            if len(worker.class_ids) >= MAX_CLASS_IDS:  # the worker keeps as many
                worker.class_ids.clear()
            worker.class_ids[key] = class_id
        return self._check_reply(worker, reply, spec, "process")


# ``ExecutionScope.extra`` keys of a gathered batch's scope: the (node_id, execution_id) of each
# of its input sets, in order, and what is told the values of each report but the last.
PER_INPUT_CONTEXTS = "tensorline.sandbox.per_input_contexts"
ON_REPORT = "tensorline.sandbox.on_report"


def _batch_of(inputs: Mapping[str, Any] | list[Mapping[str, Any]],
              scope: ExecutionScope) -> _Batch | None:
    """What a ``runs`` request tracks (None for a single ``run``)."""
    if type(inputs) is not list:
        return None
    return _Batch(len(inputs), scope, on_report=scope.extra.get(ON_REPORT))
