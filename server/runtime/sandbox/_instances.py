"""Node instances living in workers.

A fresh instance goes to an idle worker of its group: a plain node (no ``initialize``) whose
module the worker has imported is placed without an await (``_place``) and created by its
first call; others are initialized now (``_create``), so that a failure there is reported as
``during="initialize"``. A streaming instance gets a worker of its own (``_dedicate``). An
instance of a stream session is hosted (``_create(host=True)``): it never waits for an idle
worker, a worker hosts several; a one-shot node in a session is no instance at all
(``OneShotInstance``: each chunk is a call).
Reusable nodes stay warm per worker (``_acquire_warm``, at most ``warm_per_worker`` each). A
call on an instance whose worker died first re-creates it elsewhere (``_process``,
``_recreate``). A released instance's cleanup rides with its worker's next request, or is
flushed on its own when the worker stays idle (``_release_now``, ``_flush``, ``_cleanup``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from typing import Any, ClassVar

from tensorline.server._errors import LimitExceeded, ServiceUnavailable
from tensorline.server.manifest import NodeSpec
from tensorline.server.runtime._base import BatchOutcome, ExecutionScope, NodeInstance
from tensorline.server.runtime.sandbox._calls import _Calls
from tensorline.server.runtime.sandbox._failures import WorkerFailure, _WorkerGone
from tensorline.server.runtime.sandbox._messages import (
    CALLS,
    OK,
    Init,
    call_request,
    init_request,
    reached_process,
    release_request,
)
from tensorline.server.runtime.sandbox._records import _ATTEMPTS, _Batch, _Worker

log = logging.getLogger(__name__)


class SandboxInstance(NodeInstance):
    """A node instance living in a worker (``iid`` in worker ``worker``)."""

    def __init__(self, spec: NodeSpec, scope: ExecutionScope, runtime: _Instances,
                 worker: _Worker, iid: int) -> None:
        self.spec = spec
        self.scope = scope
        self._runtime = runtime
        self.worker = worker
        self.iid = iid
        self.released = False
        # False until the worker holds the instance (a lazily created one is initialized by its
        # first call).
        self.initialized = False
        self.reserved = False
        self.dedicated = False

    def unreserve(self) -> None:
        if self.reserved:
            self.reserved = False
            self.worker.reserved -= 1

    can_stream: ClassVar[bool] = True

    def process(self, inputs: Mapping[str, Any]) -> Coroutine[Any, Any, Any]:
        # The runtime's coroutine itself: no wrapper coroutine per call.
        return self._runtime._process(self, inputs)

    batches: ClassVar[bool] = True

    async def process_batch(self, batch: Sequence[Mapping[str, Any]]) -> BatchOutcome:
        if len(batch) < 2 or self.spec.timeout_s is not None:
            return await super().process_batch(batch)
        return await self._runtime._process_batch(self, list(batch))

    def stream(self, chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
        return self._runtime._stream(self, chunks)


class OneShotInstance(NodeInstance):
    """A one-shot node (``_ClassPlan.oneshot``) acquired by a stream session: nothing is
    placed, pinned or reserved for it; each chunk is one call, dispatched like a unary request
    (``SandboxRuntime.call``), so the session holds no worker between chunks and cannot starve
    the calls it needs next."""

    def __init__(self, spec: NodeSpec, scope: ExecutionScope, runtime: _Instances) -> None:
        self.spec = spec
        self.scope = scope
        self._runtime = runtime

    def process(self, inputs: Mapping[str, Any]) -> Coroutine[Any, Any, Any]:
        return self._runtime.call(self.spec, self.scope, inputs)

    batches: ClassVar[bool] = True

    async def process_batch(self, batch: Sequence[Mapping[str, Any]]) -> BatchOutcome:
        return await self._runtime.call_batch(self.spec, self.scope, batch)


def _init_request(instance: SandboxInstance) -> Init | None:
    """What the worker needs to create a not-yet-initialized instance with its first request:
    where the class lives, its validated params, node and execution ids (None once created)."""
    if instance.initialized:
        return None
    spec = instance.spec
    module, qualname = spec.entry.class_ref
    return (module, qualname, spec.params_key, spec.node_id, instance.scope.execution_id)


class _Instances(_Calls):
    """Placing, creating, warming, re-creating and releasing instances; ``process`` on one."""

    def _place(self, spec: NodeSpec, scope: ExecutionScope) -> SandboxInstance | None:
        """The common case, without the awaits of ``_create``: a plain node (no initialize,
        neither reusable nor streaming) goes to an idle worker that has imported its module, and
        is created by its first call. None when that does not apply."""
        plan = self._class_plan(spec.entry)
        if not plan.lazy:
            return None
        worker = self._idle(plan.group)
        if worker is None or plan.module not in worker.modules:
            return None
        iid = next(self._iids)
        worker.pinned.add(iid)
        worker.reserved += 1
        instance = SandboxInstance(spec, scope, self, worker, iid)
        instance.reserved = True
        return instance

    @staticmethod
    def _exclusive(spec: NodeSpec) -> bool:
        return spec.entry.streaming and not spec.entry.reusable

    def _dedicate(self, instance: SandboxInstance) -> None:
        """A fresh streaming instance owns its worker until released (see ``_pick``); ``_create``
        counted it on the worker already, the moment it picked the worker."""
        if self._exclusive(instance.spec):
            instance.dedicated = True

    def _init_request(self, spec: NodeSpec, scope: ExecutionScope, iid: int) -> tuple[Any, ...]:
        module, qualname = spec.entry.class_ref
        return init_request(iid, module, qualname, spec.params_key, spec.node_id,
                            scope.execution_id)

    async def _init_on(self, worker: _Worker, spec: NodeSpec, scope: ExecutionScope, iid: int,
                       on_abandoned: Callable[[tuple[Any, ...]], None] | None = None) -> None:
        """Initialize on ``worker``; ``_WorkerGone`` if it died before taking the request (the
        caller picks another)."""
        deadline = self._deadline(spec, scope, self.init_timeout_s)
        reply = await self._request(worker, self._init_request(spec, scope, iid), spec,
                                    "initialize", iid, deadline, on_abandoned)
        self._check_reply(worker, reply, spec, "initialize")

    async def _pick_for(self, spec: NodeSpec, scope: ExecutionScope, exclusive: bool = False,
                        host: bool = False) -> _Worker:
        try:
            return await self._pick(self._group_of(spec), exclusive, spec=spec,
                                    caller=scope.caller or scope.execution_id,
                                    deadline=self._deadline(spec, scope, None), host=host)
        except (asyncio.CancelledError, ServiceUnavailable, LimitExceeded):
            raise
        except Exception as exc:
            raise WorkerFailure(spec.node_id, f"no sandbox worker available: {exc}",
                                during="initialize", kind="unavailable") from exc

    async def _create(self, spec: NodeSpec, scope: ExecutionScope, exclusive: bool = False,
                      host: bool = False) -> tuple[_Worker, int, bool]:
        """Place a fresh instance on a worker: ``(worker, iid, initialized)``; ``host``: for a
        stream session (see ``_pick``: no wait for an idle worker, and a lazily created
        instance reserves nothing, as the session may not call it for a long time).

        A node whose class has no ``initialize`` and whose module the worker has imported
        before is created lazily by its first call (one round trip instead of two); otherwise
        it is initialized now, so that a crash while importing or initializing is reported as
        such (``during="initialize"``, which the fallback rule cares about).
        """
        for _ in range(_ATTEMPTS):
            worker = await self._pick_for(spec, scope, exclusive, host)
            iid = next(self._iids)
            worker.pinned.add(iid)
            if exclusive:
                # At once, before any await: nobody else may be placed here meanwhile.
                worker.exclusive.add(iid)
            # A call's instance reserves its worker until its process request goes out (see
            # ``_Instances._process``): the worker is promised to it, not idle. Taken before the
            # initialize request, not after: the reply that ends it frees the worker's turn and
            # wakes the next waiter before this coroutine resumes, and that waiter would see an
            # idle worker and queue its call on this worker's turn (behind this call, outside
            # the round robin and its deadline-bounded wait) while other workers stand idle.
            if not host:
                worker.reserved += 1
            if not spec.entry.has_initialize and spec.entry.class_module in worker.modules:
                return worker, iid, False

            def abandoned(reply: tuple[Any, ...], worker: _Worker = worker,
                          iid: int = iid) -> None:
                # Initialized after its caller left: release it.
                worker.pinned.discard(iid)
                if reply[0] == OK:
                    self._release_on(worker, spec, iid)

            try:
                await self._init_on(worker, spec, scope, iid, abandoned)
            except _WorkerGone:
                self._unreserve(worker, host)
                worker.pinned.discard(iid)
                continue  # died under another call before ours was sent: try another
            except asyncio.CancelledError:
                self._unreserve(worker, host)
                raise
            except BaseException:
                self._unreserve(worker, host)
                worker.pinned.discard(iid)
                raise
            worker.modules.add(spec.entry.class_module)
            return worker, iid, True
        raise WorkerFailure(spec.node_id, "sandbox workers kept dying before it could start",
                            during="initialize", kind="crash")

    def _unreserve(self, worker: _Worker, host: bool) -> None:
        """Drop the reservation ``_create`` took for a call whose instance did not come to be;
        the worker may be idle now: a waiter may take it."""
        if host:
            return
        worker.reserved -= 1
        if worker.reserved == 0 and worker.queued == 0:
            self._notify(worker.group)

    async def _acquire_warm(self, spec: NodeSpec, scope: ExecutionScope,
                            host: bool = False) -> tuple[_Worker, int]:
        key = spec.warm_key
        group = self._group_of(spec)
        for _ in range(_ATTEMPTS):
            ready = [w for w in self._workers.values() if w.state == "ready" and not w.killed
                     and w.group == group
                     and not w.dedicated]
            holders = [w for w in ready if key in w.warm]
            idle_holders = [w for w in holders if w.queued == 0 and w.warm[key].done()]
            idle_others = [w for w in ready if w.queued == 0 and w.reserved == 0
                           and key not in w.warm]
            if idle_holders:
                worker = idle_holders[0]
            elif idle_others:
                worker = min(idle_others, key=lambda w: w.last_used)
            elif holders:
                worker = min(holders, key=lambda w: w.queued)
            else:
                worker = await self._pick_for(spec, scope, host=host)
            task = worker.warm.get(key)
            if task is None or (task.done() and (task.cancelled()
                                                 or task.exception() is not None)):
                task = asyncio.ensure_future(self._init_warm(worker, spec, scope))
                self._track(task)
                worker.warm[key] = task
                self._evict_warm(worker)
            worker.warm.move_to_end(key)
            try:
                return worker, await asyncio.shield(task)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                if worker.warm.get(key) is task:
                    del worker.warm[key]
                if not isinstance(exc, _WorkerGone):
                    raise
        raise WorkerFailure(spec.node_id, "sandbox workers kept dying before it could start",
                            during="initialize", kind="crash")

    async def _init_warm(self, worker: _Worker, spec: NodeSpec, scope: ExecutionScope) -> int:
        iid = next(self._iids)
        # The first caller's deadline does not bind a shared instance.
        await self._init_on(worker, spec, ExecutionScope(scope.execution_id), iid)
        worker.modules.add(spec.entry.class_module)
        log.info("warm sandboxed instance of %s ready in worker %s (%s)", spec.node_type,
                 worker.wid, spec.params_key)
        return iid

    def _evict_warm(self, worker: _Worker) -> None:
        while len(worker.warm) > self.warm_per_worker:
            _, task = worker.warm.popitem(last=False)

            def retire(t: asyncio.Future[int], worker: _Worker = worker) -> None:
                if t.cancelled() or t.exception() is not None:
                    return
                self._track(asyncio.ensure_future(self._cleanup(worker, None, t.result())))

            if task.done():
                retire(task)
            else:
                task.add_done_callback(retire)

    async def _process(self, instance: SandboxInstance, inputs: Mapping[str, Any]) -> Any:
        spec = instance.spec
        # A request that never reached a worker (it died under someone else's call first) is
        # always safe to send elsewhere.
        for attempt in range(_ATTEMPTS):
            worker = instance.worker
            if attempt or not worker.alive:
                await self._recreate(instance)
                worker = instance.worker
            instance.unreserve()
            init = _init_request(instance)
            deadline = self._deadline(spec, instance.scope, None)
            try:
                reply = await self._request(
                    worker, call_request(instance.iid, inputs, init, None),
                    spec, "process", instance.iid, deadline)
            except _WorkerGone:
                continue
            if init is not None and reached_process(reply):
                instance.initialized = True
            try:
                return self._check_reply(worker, reply, spec, "process")
            except _WorkerGone:
                instance.initialized = False
                continue
        raise WorkerFailure(spec.node_id, "sandbox workers kept dying before it could run",
                            during="process", kind="crash")

    async def _process_batch(self, instance: SandboxInstance,
                             batch: list[Mapping[str, Any]]) -> BatchOutcome:
        """``_process`` on several input sets with ``calls`` requests (see
        ``SandboxRuntime.call_batch``): what one turn of the worker did not run goes in the
        next."""
        spec = instance.spec
        values: list[Any] = []
        attempt = 0
        while len(values) < len(batch):
            worker = instance.worker
            if attempt or not worker.alive:
                try:
                    await self._recreate(instance)
                except Exception as exc:
                    return BatchOutcome(values, exc)
                worker = instance.worker
            instance.unreserve()
            init = _init_request(instance)
            rest = batch[len(values):]
            tracked = _Batch(len(rest), instance.scope)
            request = (CALLS, instance.iid, [i if type(i) is dict else dict(i) for i in rest],
                       init, None)
            reply = self._request(worker, request, spec, "process", instance.iid,
                                  self._batch_deadline(spec, instance.scope), batch=tracked)

            def check(answer: tuple[Any, ...], worker: _Worker = worker,
                      init: Init | None = init) -> Any:
                if init is not None and reached_process(answer):
                    instance.initialized = True
                return self._check_reply(worker, answer, spec, "process")

            outcome = await self._batch_result(worker, spec, tracked, reply, check)
            values += outcome.values
            if isinstance(outcome.failure, _WorkerGone):
                # Nothing ran: the worker died before it took the request, or does not host
                # the instance (any more): create it again.
                instance.initialized = False
                attempt += 1
                if attempt >= _ATTEMPTS:
                    return BatchOutcome(values, WorkerFailure(
                        spec.node_id, "sandbox workers kept dying before it could run",
                        during="process", kind="crash"))
                continue
            if outcome.failure is not None:
                return BatchOutcome(values, outcome.failure, outcome.span)
            attempt = 0
        return BatchOutcome(values, None)

    async def _recreate(self, instance: SandboxInstance) -> None:
        """The instance's worker died (or evicted it) while it was idle: create it again."""
        spec = instance.spec
        if instance.initialized:
            log.info("re-creating sandboxed node %s (%s): %s", spec.node_id, spec.node_type,
                     instance.worker.cause or "instance evicted")
        instance.worker.pinned.discard(instance.iid)
        instance.unreserve()
        if spec.entry.reusable:
            old = instance.worker.warm.get(spec.warm_key)
            if old is not None and old.done() and not old.cancelled() and (
                    old.exception() is None and old.result() == instance.iid):
                del instance.worker.warm[spec.warm_key]
            instance.worker, instance.iid = await self._acquire_warm(spec, instance.scope, True)
            instance.initialized = True
        else:
            # Hosted (no wait for an idle worker, no reservation): the instance may belong to a
            # stream session, whose other nodes may hold the workers it would wait for.
            instance.worker, instance.iid, instance.initialized = await self._create(
                spec, instance.scope, self._exclusive(spec), host=True)
            instance.reserved = False
            self._dedicate(instance)

    def _release_now(self, instance: SandboxInstance) -> None:
        if instance.released:
            return
        instance.released = True
        if instance.reserved or instance.dedicated:
            instance.unreserve()
            instance.dedicated = False
            if instance.worker.queued == 0 and instance.worker.reserved == 0:
                self._notify(instance.worker.group)
        if instance.spec.entry.reusable:
            return
        instance.worker.pinned.discard(instance.iid)
        if instance.initialized and instance.worker.alive:
            self._release_on(instance.worker, instance.spec, instance.iid)
        # No wake-up of every waiter here: an exclusive pick never waits (it takes a free worker,
        # starts one or is refused), and a worker freed by this call's reply already woke the
        # waiter whose turn it is (``_finish``). Waking them all made each re-queue at the
        # front of the round, in wake-up order: the last one woken (often the newest caller's
        # call) went first, and the round robin was not kept.

    def _release_on(self, worker: _Worker, spec: NodeSpec | None, iid: int) -> None:
        worker.releases.append(iid)
        if worker.flush is not None:
            return
        # A node with a cleanup gets it promptly; otherwise only memory is at stake and the
        # release can wait for the next request.
        has_cleanup = spec is None or spec.entry.has_cleanup
        assert self._loop is not None
        worker.flush = self._loop.call_later(0.0 if has_cleanup else 0.5, self._flush, worker)

    def _flush(self, worker: _Worker) -> None:
        worker.flush = None
        if worker.releases and worker.alive and not self._closed:
            self._track(asyncio.ensure_future(self._cleanup(worker, None, 0)))

    async def _cleanup(self, worker: _Worker, spec: NodeSpec | None, iid: int) -> None:
        """Send the pending releases of ``worker`` (plus ``iid``, if given) on their own."""
        if iid:
            worker.releases.append(iid)
        try:
            if worker.alive:
                await self._request(worker, release_request(None), spec, "cleanup", 0,
                                    self._now() + self.call_timeout_s)
        except _WorkerGone:
            pass  # died with the worker: nothing left to clean up
        except Exception as exc:
            log.warning("releasing sandboxed instances failed: %s", exc)
