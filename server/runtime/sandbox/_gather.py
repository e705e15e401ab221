"""Gathering: under concurrent load, short one-shot calls of one node share a worker round trip.

A sandboxed call costs its worker a request and a reply, and the server a send, a receive and a
loop callback: ~90 µs of CPU in all while callers keep the workers busy (``python
bench/bench_sandbox_hop.py --batches 1``). Behind the service, with 32 calls in flight, calls
reach the sandbox a few hundred µs apart, each finds its worker asleep, and the round trip costs
twice that (``python bench/bench_unary.py --runtime sandbox --cpu-detail``). So while the
sandbox is loaded, a call of a short one-shot node waits up to ``batch_wait_s`` for other calls
of the same node and parameters, and they go to one worker as one ``runs`` request, each input
set with its own node id and execution id (``PER_INPUT_CONTEXTS``); the worker runs them in
order, as it runs a stream's queued chunks.

Loaded means that a call was sent while another was in flight within ``LOADED_S``: a client
that waits for each reply before its next request never waits here. Short means that the node's
last call took under ``_placement.SHORT_S`` (request to reply): a slow node gains nothing from
sharing a round trip, and would hold the others. A node with a ``timeout_s`` of its own is never
gathered (its expiry is reported per call).

The wait ends early when the event loop idles: looked at every ``LOOK_S``, a loop thread that
worked less than ``IDLE_SHARE`` of the time since the last look is handling no request that
could bring another call (the callers are all waiting here, say), and the calls are sent.

Off by default (``batch_wait_s`` 0; ``TENSORLINE_SANDBOX_BATCH_WAIT_MS`` turns it on): it pays
with many callers at once and costs with a few, and no rule seen from inside the server tells
the two apart well enough yet (the executions the service runs at once are a handful in both
cases: the rest of 32 calls in flight wait in gRPC's queue). Measured with 1 KiB calls, calls/s
against the echo, on against off in the same run (docs/performance.md, "Gathering"): a plain
2 ms wait gave 0.78-0.93x against 0.49-0.60x at 32 in flight, but 0.37x against 0.59x at 4;
with the idle rule, 0.66x against 0.54x at 32, 0.63x against 0.59x at 8, 0.51x against 0.56x
at 4.

What a call guarantees holds for each gathered call, apart from that wait:

* **Values and failures are its own.** A call whose node fails gets its own error; the calls
  after it in the batch did not run and are sent again, gathered anew. When the worker dies in
  a batch (a crash, a limit, a deadline), the calls it had not answered run again one by one,
  so that only the call that kills a worker on its own fails (an input set that ran before the
  death and was not reported yet runs twice: one-shot nodes keep no state between calls).
* **No call waits for another's stall.** A batch whose worker reports nothing for ``STALL_S``
  (20 ms, ten times a short node's call) hands every call it has not answered back to its
  caller, which runs it alone (on another worker, the pool growing as for any call), and its
  worker is stopped as a cancelled call's is; the worker reports every millisecond at most, so
  which of them it runs is not known. An input that hangs and ignores the cancellation thus
  holds a second worker for ``cancel_grace_s``, and one that ran unreported runs twice.
* **Deadlines**: each input set has a call's deadline from the worker's last report, as in a
  stream's batch (``_calls._batch_deadline``), drawn from the latest deadline of the batch's
  calls; a call whose own deadline passes first is cancelled by its caller as any call is.
* **Cancellation**: a call cancelled while it waits leaves the batch before it is sent; one
  cancelled once the batch is sent and before it is answered stops the batch as a cancelled
  call is stopped (SIGUSR1: the running input set's context says cancelled, no input set starts
  after it, a kill after ``cancel_grace_s``), and the calls the batch did not answer then run
  alone (which one the worker runs, it does not say: it reports every millisecond at most).
* **Turns**: a batch holds its worker ``BATCH_TURN_S`` at most (the rest waits for the next
  turn, in line with other callers), as a stream's batch does.

The wait is the price: up to ``batch_wait_s`` more per call while the sandbox is loaded, against
up to 40% less CPU per call (figures in docs/performance.md, "Gathering").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tensorline.server._errors import ServiceUnavailable
from tensorline.server.manifest import NodeSpec
from tensorline.server.runtime._base import BatchOutcome, ExecutionScope
from tensorline.server.runtime.sandbox._calls import ON_REPORT, PER_INPUT_CONTEXTS
from tensorline.server.runtime.sandbox._failures import _WorkerGone
from tensorline.server.runtime.sandbox._records import _ClassPlan, _Group, _Worker
from tensorline.server.runtime.sandbox._streaming import _Streaming

# A call sent while another was in flight this recently: the sandbox is loaded.
LOADED_S = 0.05
# Calls in one batch at most (a full batch is sent at once).
MAX_GATHERED = 16
# While calls wait, how often the loop's work is looked at, and the share of that time the
# loop's thread must have worked for them to wait on (see ``_look_gathered``).
LOOK_S = 0.0001
IDLE_SHARE = 0.5
# A gathered batch whose worker has answered nothing for this long (ten times what a short
# node's call may take) is stalled on one input set: the calls it has not answered run alone.
STALL_S = 0.02

# Calls gathered together: one worker group, class and parameters, and node id (errors name it).
_GatherKey = tuple[_Group, tuple[str, str], str, str]


# What a gathered call's future is resolved with when its caller must run it alone.
_ALONE: Any = object()


@dataclass(slots=True, eq=False)
class _InFlight:
    """A gathered batch sent to a worker: its calls, how many the worker has answered (it runs
    ``members[reported]``), and its scope (which tells its request from another's)."""

    members: list[_Member]
    scope: ExecutionScope | None = None
    worker: _Worker | None = None
    reported: int = 0
    # The worker was told to stop the batch (a call was cancelled, or it stalled): it stops
    # before its next input set, with an error that belongs to none of the calls left.
    stopped: bool = False


@dataclass(slots=True, eq=False)
class _Member:
    spec: NodeSpec
    scope: ExecutionScope
    inputs: Mapping[str, Any]
    future: asyncio.Future[Any]
    batch: _InFlight | None = None


@dataclass(slots=True, eq=False)
class _Gathered:
    plan: _ClassPlan
    # Loop time by which it is sent whatever happens (``batch_wait_s`` after the first call).
    deadline: float
    members: list[_Member] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    # The event loop thread's CPU time and the loop time at the last look (``_look_gathered``).
    cpu_at: float = 0.0
    looked_at: float = 0.0


class _Gathering(_Streaming):
    """Short one-shot calls gathered into shared ``runs`` requests while the sandbox is loaded."""

    def _gathers(self, spec: NodeSpec) -> bool:
        """Whether a one-shot call of ``spec`` waits to share a round trip (see the module's
        docstring)."""
        return bool(self.batch_wait_s and spec.timeout_s is None
                    and (self._busy or self._now() - self._overlapped_at < LOADED_S)
                    and self._placement.is_short(spec.node_type))

    async def _gathered_call(self, plan: _ClassPlan, spec: NodeSpec, scope: ExecutionScope,
                             inputs: Mapping[str, Any]) -> Any:
        loop = self._loop
        assert loop is not None
        key = (plan.group, spec.entry.class_ref, spec.params_key, spec.node_id)
        gathered = self._gathering.get(key)
        if gathered is None:
            now = loop.time()
            gathered = self._gathering[key] = _Gathered(plan, now + self.batch_wait_s,
                                                        cpu_at=time.thread_time(),
                                                        looked_at=now)
            gathered.timer = loop.call_later(LOOK_S, self._look_gathered, key, gathered)
        member = _Member(spec, scope, inputs, loop.create_future())
        gathered.members.append(member)
        self._gathered_calls += 1
        if len(gathered.members) >= MAX_GATHERED:
            self._send_gathered(key, gathered)
        try:
            value = await member.future
        except asyncio.CancelledError:
            # Before it was sent, the batch leaves it out; sent and not answered yet, the
            # batch is stopped as a cancelled call is (``_cancel_gathered``).
            self._cancel_gathered(member)
            raise
        if value is _ALONE:
            # Alone after all (the only one, or taken from a batch): the caller's own call,
            # whose cancellation reaches the worker as any call's does.
            self._check_open()
            return await self._call_now(spec, scope, inputs, plan)
        return value

    def _cancel_gathered(self, member: _Member) -> None:
        # The worker may be running it: which of the calls it has not answered it runs, it
        # does not say (it reports every millisecond at most).
        batch = member.batch
        # (Identity: a member's inputs hold arrays, which do not compare to a bool.)
        if batch is not None and any(m is member for m in batch.members[batch.reported:]):
            self._stop_batch(batch)

    def _stop_batch(self, batch: _InFlight) -> None:
        """Have the worker stop ``batch`` as it stops a cancelled call (SIGUSR1: the node's
        context says cancelled, and no input set starts after it; killed if it has not answered
        within ``cancel_grace_s``)."""
        worker = batch.worker
        call = worker.inflight if worker is not None else None
        if (worker is not None and call is not None and call.batch is not None
                and call.batch.scope is batch.scope and not call.abandoned):
            batch.stopped = True
            self._abandon(worker, call)

    def _look_gathered(self, key: _GatherKey, gathered: _Gathered) -> None:
        """Every ``LOOK_S`` while calls wait: send them once the wait is over, or as soon as
        the event loop's thread spent less than ``IDLE_SHARE`` of the time since the last look
        working. An idle loop is handling no request that could bring another call (the callers
        are all waiting here, say): waiting on would only make them later."""
        loop = self._loop
        assert loop is not None
        now, cpu = loop.time(), time.thread_time()
        idle = cpu - gathered.cpu_at < IDLE_SHARE * (now - gathered.looked_at)
        if idle or now >= gathered.deadline:
            self._send_gathered(key, gathered)
            return
        gathered.cpu_at, gathered.looked_at = cpu, now
        gathered.timer = loop.call_later(LOOK_S, self._look_gathered, key, gathered)

    def _send_gathered(self, key: _GatherKey, gathered: _Gathered) -> None:
        """The wait is over (or the batch is full): send what was gathered."""
        if self._gathering.get(key) is not gathered:
            return
        del self._gathering[key]
        if gathered.timer is not None:
            gathered.timer.cancel()
        members = [m for m in gathered.members if not m.future.done()]
        if len(members) == 1:
            members[0].future.set_result(_ALONE)
        elif members:
            self._track(asyncio.ensure_future(self._run_gathered(gathered.plan, members)))

    async def _run_gathered(self, plan: _ClassPlan, members: list[_Member]) -> None:
        """Run the gathered calls: as ``runs`` batches while more than one is left (a failure
        fails its own call only; see the module's docstring); the rest go back to their
        callers to run alone."""
        alone: list[_Member] = []
        try:
            again = False
            while True:
                # Those cancelled, answered, or taken from a stalled batch meanwhile are done.
                members = [m for m in members if not m.future.done()]
                if len(members) < 2:
                    break
                batch = _InFlight(members)
                outcome = await self._gathered_batch(plan, batch, again)
                if outcome is None:  # no worker of the class to take it
                    break
                again = True
                ran = len(outcome.values)
                for member, value in zip(members, outcome.values, strict=False):
                    if not member.future.done():
                        member.future.set_result(value)
                rest = members[ran:]
                failure = outcome.failure
                if batch.stopped:
                    # Stopped for a cancelled call or a stall: how it ended is nobody's failure
                    # (the input set it ran was cancelled); what it did not answer runs alone.
                    alone, members = rest, []
                elif failure is None:
                    members = rest  # the worker's turn ended first: the rest again
                elif isinstance(failure, _WorkerGone) or outcome.span > 1:
                    # Nothing of it ran, or the worker died with several calls unanswered:
                    # each runs again alone, so that only the one that kills a worker fails.
                    alone, members = rest, []
                else:
                    if not rest[0].future.done():
                        rest[0].future.set_exception(failure)
                    members = rest[1:]
            alone += members
        except Exception as exc:
            for member in members:
                if not member.future.done():
                    member.future.set_exception(exc)
        for member in alone:
            if not member.future.done():
                member.future.set_result(_ALONE)

    async def _gathered_batch(self, plan: _ClassPlan, batch: _InFlight,
                              again: bool) -> BatchOutcome | None:
        """One ``runs`` request for ``members`` (what a worker's turn ran of it), on an idle
        worker or the next one freed; None when no worker serves the class. Each value is
        handed to its call as soon as the worker reports it; when the worker reports nothing
        for ``STALL_S``, the calls it has not answered go back to their callers."""
        loop = self._loop
        assert loop is not None
        members = batch.members
        spec = members[0].spec
        deadlines = [m.scope.deadline for m in members]
        stall: asyncio.TimerHandle | None = None

        def on_stall() -> None:
            # Which of the calls it has not answered the worker runs, it does not say (it
            # reports every millisecond at most): they all go back to their callers, and the
            # worker is told to stop (nobody waits for what it runs any more).
            for member in members[batch.reported:]:
                if not member.future.done():
                    member.future.set_result(_ALONE)
            self._stop_batch(batch)

        def on_report(values: list[Any]) -> None:
            nonlocal stall
            for member, value in zip(members[batch.reported:], values, strict=False):
                if not member.future.done():
                    member.future.set_result(value)
            batch.reported += len(values)
            if stall is not None:
                stall.cancel()
            stall = loop.call_later(STALL_S, on_stall)

        scope = batch.scope = ExecutionScope(
            execution_id=members[0].scope.execution_id,
            deadline=None if None in deadlines else max(d for d in deadlines if d is not None),
            caller=members[0].scope.caller,
            extra={PER_INPUT_CONTEXTS: [(m.spec.node_id, m.scope.execution_id)
                                        for m in members],
                   ON_REPORT: on_report})
        inputs = [m.inputs for m in members]
        for member in members:
            member.batch = batch
        try:
            while True:
                self._check_open()
                worker = self._idle(plan.group)
                if worker is None:
                    if not self._serving(plan):
                        return None
                    self._grow(plan.group)
                    started = await self._wait_for_run(plan, spec, scope, inputs, again)
                    if started is None:
                        again = True
                        continue
                    batch.worker = started[0]
                    stall = loop.call_later(STALL_S, on_stall)
                    return await self._run_batch_dispatched(started, spec)
                if plan.module not in worker.modules:
                    return None
                batch.worker = worker
                stall = loop.call_later(STALL_S, on_stall)
                return await self._run_batch_once(worker, spec, scope, inputs)
        finally:
            if stall is not None:
                stall.cancel()
            for member in members:
                member.batch = None

    def _drop_gathered(self) -> None:
        """(Shutdown.) Calls still waiting to be sent fail: the runtime is shutting down."""
        for gathered in self._gathering.values():
            if gathered.timer is not None:
                gathered.timer.cancel()
            for member in gathered.members:
                if not member.future.done():
                    member.future.set_exception(
                        ServiceUnavailable("the sandbox runtime is shut down"))
        self._gathering.clear()

    async def _call_now(self, spec: NodeSpec, scope: ExecutionScope,
                        inputs: Mapping[str, Any], plan: _ClassPlan) -> Any:
        """``call`` without gathering (defined by ``SandboxRuntime``)."""
        raise NotImplementedError

