"""The sandbox's worker pool: workers' lives and choosing one for a call.

Workers are started through the launcher (``_spawn``, ``_start_worker``) for one group
``(memory cap, trust domain)`` each; the groups ``start()`` started are kept at strength
(``_replace``), others start on first use, up to ``max_workers``. The launcher reports each
worker's exit (``_on_exit``): its call in flight fails, its record is forgotten, its scratch
removed. A worker that is broken or worn is recycled (``_recycle``) and one that is no longer
wanted retired (``_retire``: no new work, its cleanups run, then it ends); idle workers answer a
probe every ``probe_interval_s``. A call gets the most recently used idle worker of its group
(``_idle``, ``_pick``); when every one is busy the pool grows (``_grow``, up to ``max_workers``
per trust domain) and the call waits, round robin by caller and bounded by its deadline
(``_pool_change``, ``_notify``); workers the pool grew for are retired after ``idle_s`` idle
(``_shrink``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
from collections.abc import Callable
from typing import Any

from tensorline.server._errors import LimitExceeded, ServiceUnavailable
from tensorline.server.manifest import NodeSpec
from tensorline.server.runtime._base import LayerStatus
from tensorline.server.runtime.sandbox import _isolation, _shm
from tensorline.server.runtime.sandbox._core import _Core
from tensorline.server.runtime.sandbox._failures import _signal_name
from tensorline.server.runtime.sandbox._messages import EXIT_REQUEST, PROBE_REQUEST
from tensorline.server.runtime.sandbox._output import WorkerOutput
from tensorline.server.runtime.sandbox._records import _current_node, _Group, _Worker
from tensorline.server.runtime.sandbox._uids import UidLeases
from tensorline.server.runtime.sandbox._worker import WorkerConfig

log = logging.getLogger(__name__)


class _Pool(_Core):
    """Starting, replacing, recycling, retiring and probing workers; picking an idle one."""

    # --- spawning and death -------------------------------------------------------------------

    async def _spawn(self, group: _Group) -> _Worker:
        """Start a worker and wait until it is ready. The start itself is shielded: a caller
        that gives up does not leave a half-started process behind (the worker joins the pool).
        """
        return await asyncio.shield(self._start(group))

    def _start(self, group: _Group, reserved: bool = False) -> asyncio.Future[_Worker]:
        if self._closed:
            raise ServiceUnavailable("the sandbox runtime is shut down")
        # Counted at once, until the task registers the worker (a loop iteration later): the
        # pool's size must include it, or every waiter in between would grow the pool again.
        self._pending[group] = self._pending.get(group, 0) + 1
        return self._track(asyncio.ensure_future(self._start_worker(group, reserved)))

    async def _start_worker(self, group: _Group, reserved: bool = False) -> _Worker:
        cap_mb, domain = group
        self._pending[group] -= 1
        loop = asyncio.get_running_loop()
        wid = next(self._wids)
        scratch = os.path.join(self._scratch_root, f"w{wid}")
        os.makedirs(scratch, mode=0o700, exist_ok=True)
        # The worker takes this uid if it can still read what it needs as it (and then owns
        # its scratch dir); it reports the outcome as the "unprivileged uid" layer.
        uid, uid_lease = (self._uid_leases.acquire(wid) if self._uids_usable else (None, -1))
        worker = _Worker(wid=wid, cap_mb=cap_mb, domain=domain, scratch_dir=scratch,
                         inline_max=self.inline_max_bytes, uid=uid, uid_lease=uid_lease)
        # Started for a streaming session (see ``_dedicated_worker``): promised from the
        # start, or another pick could take it between its "ready" and the session's turn.
        worker.reserved = int(reserved)
        worker.outbox = _shm.Outbox(inline_max=self.inline_max_bytes, name=f"tensorline-w{wid}")
        worker.ready = loop.create_future()
        worker.dead = loop.create_future()
        self._workers[wid] = worker
        config = WorkerConfig(
            worker_id=wid,
            limits=_isolation.Limits(memory_mb=cap_mb, cpu_seconds=self.cpu_seconds,
                                     cpu_seconds_lifetime=self.cpu_seconds_lifetime,
                                     nofile=self.nofile, fsize_mb=self.fsize_mb,
                                     threads=self.threads, scratch_mb=self.scratch_mb),
            scratch_dir=scratch,
            inline_max=self.inline_max_bytes,
            # Resolved here: the worker cannot look below a directory it cannot enter.
            devices=tuple(_isolation.device_paths(self.devices)),
            read_paths=self._read_paths,
            model_paths=self.model_paths,
            list_paths=self._list_paths,
            uid=uid,
            recycle_rss_mb=(self.recycle_rss_mb if self.recycle_rss_mb is not None
                            else cap_mb * 3 // 4),
            **self._isolation,
        )
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        output_r, output_w = os.pipe()
        assert self._launcher is not None
        try:
            pid = await self._launcher.spawn(config, child, output_w)
        except BaseException:
            parent.close()
            os.close(output_r)
            self._workers.pop(wid, None)
            shutil.rmtree(scratch, ignore_errors=True)
            self._spawn_failures += 1
            raise
        finally:
            child.close()
            os.close(output_w)
        worker.process_id = pid
        with contextlib.suppress(OSError):
            worker.pidfd = os.pidfd_open(pid)
        self._by_pid[pid] = worker
        worker.output = WorkerOutput(loop, output_r, wid, lambda: _current_node(worker))
        parent.setblocking(False)
        worker.sock = parent
        loop.add_reader(parent.fileno(), self._on_readable, worker)
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), self.start_timeout_s)
        except BaseException as exc:
            worker.kill("did not become ready in time" if isinstance(exc, TimeoutError) else
                        "start abandoned")
            self._spawn_failures += 1
            raise
        self._spawn_failures = 0
        worker.last_used = self._now()
        if self._closed:
            worker.kill("server shutting down")
            raise ServiceUnavailable("the sandbox runtime is shut down")
        return worker

    def _recycle(self, worker: _Worker, why: str) -> None:
        """Replace a worker that is broken or worn before it gets another call (the call in
        flight, if any, still completes there)."""
        if worker.state != "ready" or self._closed:
            return
        log.warning("recycling sandbox worker %s (pid %s): %s", worker.wid, worker.pid, why)
        self._recycles += 1
        self._retire(worker, why)

    def _misbehaved(self, worker: _Worker, what: str) -> None:
        log.error("sandbox worker %s (pid %s) broke the protocol: %s; killing it", worker.wid,
                  worker.pid, what)
        worker.kill(f"worker broke the control protocol ({what})")

    def _on_eof(self, worker: _Worker) -> None:
        # The socket closes when the process exits; a worker that closed it and lives on is
        # broken either way. SIGKILL does not change the status of an already dying process.
        worker.eof = True
        if worker.sock is not None and self._loop is not None:
            self._loop.remove_reader(worker.sock.fileno())
        worker.kill(None)

    def _on_exit(self, pid: int, code: int) -> None:
        """The launcher reaped a worker (or died, taking its workers with it)."""
        worker = self._by_pid.pop(pid, None)
        if worker is None or worker.state == "dead":
            return
        self._placement.forget(pid)
        cause = self._cause(worker, code)
        was_starting = worker.state == "starting"
        worker.state = "dead"
        worker.cause = cause
        level = logging.INFO if worker.kill_reason in ("server shutting down", "retired") or (
            self._closed) else logging.WARNING
        log.log(level, "sandbox worker %s (pid %s, cap %d MiB) ended: %s", worker.wid,
                worker.pid, worker.cap_mb, cause)
        call = worker.inflight
        if call is not None:
            self._finish(worker, call)
            if not call.future.done():
                call.future.set_exception(self._death_error(call, cause))
        # Pending warm initializations fail on their own (their request gets the death error,
        # or _WorkerGone if it was not sent): cancelling them would look like a cancelled caller.
        worker.warm.clear()
        if worker.ready is not None and not worker.ready.done():
            worker.ready.set_exception(RuntimeError(f"sandbox worker failed to start: {cause}"))
            worker.ready.exception()
        if worker.dead is not None and not worker.dead.done():
            worker.dead.set_result(cause)
        self._forget(worker)
        if not self._closed and not was_starting:
            self._restarts += 1
            if worker.kill_reason != "retired":
                self._replace(worker.group)
        self._notify(everyone=True)

    def _cause(self, worker: _Worker, code: int) -> str:
        if worker.kill_reason is not None:
            return worker.kill_reason
        if code < 0:
            sig = -code
            if sig == signal.SIGXCPU:
                return (f"CPU time limit exceeded (SIGXCPU): more than {self.cpu_seconds:g} s "
                        "of CPU in one call")
            if sig == signal.SIGSYS:
                return "worker killed by seccomp (SIGSYS): a system call of another ABI"
            return f"worker killed by signal {sig} ({_signal_name(sig)})"
        if code == 70:
            return "worker exited: the server went away"
        return f"worker exited with status {code}"

    def _forget(self, worker: _Worker) -> None:
        loop = self._loop
        if worker.watchdog is not None:
            worker.watchdog.cancel()
            worker.watchdog = None
        if worker.paused is not None:
            # Before the socket closes: its fd number could name another socket by then.
            worker.paused.cancel()
            worker.paused = None
        if worker.sock is not None:
            if loop is not None and not worker.eof:
                with contextlib.suppress(Exception):
                    loop.remove_reader(worker.sock.fileno())
            worker.sock.close()
            worker.sock = None
        if worker.state == "dead":
            if worker.pidfd >= 0:
                os.close(worker.pidfd)
                worker.pidfd = -1
            if worker.output is not None:
                worker.output.close()
        worker.outbox.close()
        worker.inbox.close()
        if worker.state == "dead":
            self._workers.pop(worker.wid, None)
            shutil.rmtree(worker.scratch_dir, ignore_errors=True)
            # Only now: the process is gone, so no other server's worker can meet it.
            UidLeases.release(worker.uid_lease)
            worker.uid_lease = -1

    def _replace(self, group: _Group) -> None:
        """Keep the groups started by ``start()`` at strength; others restart on demand."""
        if self._closed or group not in self._baseline():
            return
        want = self.workers if group == self._default_group else self.workers_per_domain
        live = sum(1 for w in self._workers.values()
                   if w.group == group and w.state in ("starting", "ready"))
        if live >= want:
            return
        self._spawn_background(group)

    def _baseline(self) -> list[_Group]:
        return [self._default_group] + [(self.memory_mb_default, d) for d in self.domains]

    def _spawn_background(self, group: _Group) -> None:
        def started(task: asyncio.Future[_Worker]) -> None:
            if not task.cancelled() and (exc := task.exception()) is not None and (
                    not self._closed):
                log.error("could not start a sandbox worker for pool %s: %s",
                          self._pool_name(group), exc)

        if not self._closed:  # called from loop callbacks: must not raise
            self._start(group).add_done_callback(started)

    def _record_layers(self, worker: _Worker) -> None:
        """A layer counts as active only when every live worker has it. Workers start one after
        another, so this runs once per worker: while ``start`` runs nothing is logged (it logs
        one summary, ``_log_layers``), afterwards only a layer turning on or off is (a detail
        such as a replacement worker's own uid is no change)."""
        merged: dict[str, LayerStatus] = {}
        for w in [*(w for w in self._workers.values() if w.alive and w is not worker), worker]:
            for name, active, detail in w.layers:
                known = merged.get(name)
                if known is None or (known.active and not active):
                    merged[name] = LayerStatus(name, active, detail)
        layers = list(merged.values())
        if self._layers_reported:
            before = {layer.name: layer.active for layer in self._layers}
            for layer in layers:
                if before.get(layer.name) != layer.active:
                    _log_layer(layer)
        self._layers = layers

    def _log_layers(self) -> None:
        """The startup summary: each layer once."""
        for layer in self._layers:
            _log_layer(layer)
        self._layers_reported = True

    def _retire(self, worker: _Worker, why: str, *, replace: bool = True) -> None:
        """Stop giving the worker new work; end it (running its cleanups) once it is idle."""
        if worker.state != "ready":
            return
        worker.state = "retiring"
        worker.kill_reason = "retired"
        log.info("retiring sandbox worker %s: %s", worker.wid, why)

        async def retire() -> None:
            with contextlib.suppress(Exception):
                await self._request(worker, EXIT_REQUEST, None, "cleanup", 0,
                                    self._now() + self.cancel_grace_s)
            worker.kill("retired")

        self._track(asyncio.ensure_future(retire()))
        if replace:
            self._replace(worker.group)

    async def _probe_idle_workers(self) -> None:
        """Every ``probe_interval_s``, each worker idle that long answers a probe (and checks its
        own health before it does, see ``_worker._check_health``); one that does not answer
        within ``cancel_grace_s`` is killed and replaced like any call past its deadline."""
        while not self._closed:
            await asyncio.sleep(self.probe_interval_s)
            now = self._now()
            for worker in list(self._workers.values()):
                if (worker.state == "ready" and not worker.killed and worker.queued == 0
                        and worker.reserved == 0 and not worker.dedicated
                        and now - worker.last_used >= self.probe_interval_s):
                    self._track(asyncio.ensure_future(self._probe(worker)))

    async def _probe(self, worker: _Worker) -> None:
        with contextlib.suppress(Exception):
            await self._request(worker, PROBE_REQUEST, None, "probe", 0,
                                 self._now() + self.cancel_grace_s)

    # --- choosing a worker --------------------------------------------------------------------

    @staticmethod
    def _pool_name(group: _Group) -> str:
        cap, domain = group
        return (f"untrusted:{domain}" if domain else "trusted") + f" ({cap} MiB)"

    def _exhausted(self, spec: NodeSpec | None, group: _Group, waited: float,
                   why: str) -> LimitExceeded:
        """Waiting for a worker ran out of time: RESOURCE_EXHAUSTED naming the node and the
        pool, with a retry hint (a busy pool frees up; a caller may try again)."""
        node = "a sandboxed request" if spec is None else (
            f"node '{spec.node_id}' ({spec.node_type})")
        busy = sum(1 for w in self._workers.values() if w.group == group and w.alive)
        return LimitExceeded(
            f"{node} found no free worker in sandbox pool {self._pool_name(group)}: {why} "
            f"(waited {waited:.2f} s; {busy} worker(s), at most {self.max_workers} shared per "
            "domain); try again later", retry_after_s=1.0)

    def _wait_deadline(self, deadline: float) -> float:
        """When a wait for a worker gives up: a little before the call's deadline, so the
        refusal reaches the caller before its own deadline turns it into a bare
        DEADLINE_EXCEEDED that names nothing."""
        now = self._now()
        return deadline - min(0.25, max(0.0, deadline - now) * 0.1)

    def _shared(self, domain: str) -> int:
        """Workers of ``domain`` that count against ``max_workers`` (starting or serving, not
        owned by a streaming session)."""
        return sum(1 for w in self._workers.values() if w.domain == domain
                   and w.state in ("starting", "ready") and not w.killed and not w.dedicated
                   ) + sum(n for g, n in self._pending.items() if g[1] == domain)

    def _grow(self, group: _Group) -> bool:
        """A call of ``group`` found every worker busy: start one more in the background when
        the domain has room and none of the group is starting already (one at a time: the
        next waiter grows it again once this one is ready). True if one is coming."""
        if self._closed:
            return False
        if self._pending.get(group):
            return True
        for w in self._workers.values():
            if w.state == "starting" and w.group == group:
                return True
        if self._shared(group[1]) >= self.max_workers:
            return False
        self._spawn_background(group)
        return True

    async def _pick(self, group: _Group, exclusive: bool = False, *,
                    spec: NodeSpec | None = None, caller: str = "",
                    deadline: float | None = None, host: bool = False) -> _Worker:
        """A worker for a new instance (or a request) of ``group``.

        * ``exclusive`` (a streaming instance, which holds its worker's turn for a whole
          session): a worker hosting nothing else, else a new one. The dedicated workers have a
          budget of their own (``max_workers`` more per domain); past it the session is refused
          at once (never holding workers while it waits for more: that is how sessions
          deadlock).
        * ``host`` (an instance of a stream session, which calls it later, chunk by chunk): an
          idle worker, else a new one if the domain has room, else the least loaded shared
          worker; a worker hosts any number of instances and runs their calls in turn, so
          placing one never waits for another session to end.
        * otherwise (a call about to be sent): an idle worker, growing the pool up to
          ``max_workers``, else wait for one to free up, round robin by ``caller``, until
          ``deadline`` (then ``LimitExceeded`` naming the node and the pool).
        """
        began = self._now() if self._loop is not None else 0.0
        expire = None if deadline is None else self._wait_deadline(deadline)
        again = False
        while True:
            if self._closed:
                raise ServiceUnavailable("the sandbox runtime is shut down")
            if exclusive:
                # The budget first, whether the worker is taken from the shared ones or
                # started: a free shared worker taken here leaves the shared pool to grow back,
                # so taking them without counting let streaming sessions and the calls that
                # regrow the pool start workers without bound.
                dedicated = sum(1 for w in self._workers.values() if w.domain == group[1]
                                and w.alive and w.dedicated) + self._dedicating.get(group[1], 0)
                if dedicated >= self.max_workers:
                    raise self._exhausted(spec, group, 0.0, (
                        f"{dedicated} workers are held by (or starting for) streaming "
                        f"sessions, at most {self.max_workers} per domain"))
                free = [w for w in self._workers.values() if w.state == "ready"
                        and not w.killed and w.group == group and not w.pinned
                        and not w.dedicated and w.queued == 0 and w.reserved == 0]
                if free:
                    return max(free, key=lambda w: w.last_used)
                return await self._dedicated_worker(group)
            idle_worker = self._idle(group)
            if idle_worker is not None:
                return idle_worker
            coming = self._grow(group)
            shared = [w for w in self._workers.values() if w.state == "ready" and not w.killed
                      and w.group == group and not w.dedicated]
            if host and shared:
                return min(shared, key=lambda w: (w.queued + w.reserved + len(w.pinned),
                                                  -w.last_used))
            if not shared and not coming:
                # The domain is full of workers of other groups (other memory caps): make room.
                idle = [w for w in self._workers.values() if w.state == "ready"
                        and w.domain == group[1] and w.group != group and not w.pinned
                        and not w.lock.locked() and w.reserved == 0 and not w.dedicated]
                if idle:
                    self._retire(min(idle, key=lambda w: w.last_used),
                                 f"making room for a worker of pool {self._pool_name(group)}",
                                 replace=False)
                    return await self._spawn(group)
            await self._pool_change(group, caller, expire, lambda: self._exhausted(
                spec, group, self._now() - began, "every worker stayed busy"), again)
            again = True

    async def _dedicated_worker(self, group: _Group) -> _Worker:
        """Start a worker for a streaming session. Until it is the session's, it counts
        against the domain's dedicated budget (``_dedicating``: a burst of sessions would
        otherwise each see the budget free and start one worker each, a thousand sessions a
        thousand workers) and it is reserved (nobody else may take it once ready). The caller
        adds the session's instance to ``exclusive`` without awaiting in between."""
        domain = group[1]
        self._dedicating[domain] = self._dedicating.get(domain, 0) + 1
        counted = True

        def uncount() -> None:
            nonlocal counted
            if counted:
                counted = False
                self._dedicating[domain] -= 1

        start = self._start(group, reserved=True)
        try:
            worker = await asyncio.shield(start)
        except asyncio.CancelledError:
            # The session gave up; the worker still joins the pool, as a shared one.
            def release(task: asyncio.Future[_Worker]) -> None:
                uncount()
                if not task.cancelled() and task.exception() is None:
                    late = task.result()
                    late.reserved -= 1
                    if late.queued == 0 and late.reserved == 0:
                        self._notify(late.group)

            start.add_done_callback(release)
            raise
        except BaseException:
            uncount()
            raise
        uncount()
        worker.reserved -= 1
        return worker

    def _idle(self, group: _Group) -> _Worker | None:
        """The most recently used idle worker of ``group``, if any: at low concurrency the same
        worker keeps serving, with its caches warm (measured faster than spreading calls)."""
        cap, domain = group
        best: _Worker | None = None
        for w in self._workers.values():
            if (w.state == "ready" and not w.killed and w.queued == 0 and w.reserved == 0
                    and w.cap_mb == cap
                    and w.domain == domain and not (w.exclusive and w.dedicated)
                    and (best is None or w.last_used > best.last_used)):
                best = w
        return best

    async def _pool_change(self, group: _Group, caller: str = "", expire: float | None = None,
                           refusal: Callable[[], Exception] | None = None,
                           again: bool = False) -> None:
        """Wait (in ``caller``'s line of ``group``, see ``_Waiters``) until a worker becomes
        idle, ready or dead; past ``expire`` (loop time) raise ``refusal()``."""
        assert self._loop is not None
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._line(group).add(caller, waiter, again)
        timer = None
        if expire is not None and refusal is not None:
            timer = self._loop.call_at(expire, _expire, waiter, refusal)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._notify(group)  # pass on the wake-up this cancelled waiter consumed
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if not waiter.done():
                waiter.cancel()

    def _notify(self, group: _Group | None = None, everyone: bool = False) -> None:
        """Wake the waiter of ``group`` whose turn it is (a worker of it became idle: one can
        use it), or (``everyone``, or no group) every waiter of every group."""
        if group is not None and not everyone:
            line = self._waiters.get(group)
            if line is not None and (waiter := line.pop()) is not None:
                waiter.set_result(None)
            return
        for line in self._waiters.values():
            while (waiter := line.pop()) is not None:
                waiter.set_result(None)

    # --- shrinking ----------------------------------------------------------------------------

    async def _shrink_idle_workers(self) -> None:
        """Retire workers the pool grew for once they have been idle ``idle_s`` (never below a
        group's baseline, never one holding instances: their state would be lost)."""
        while not self._closed:
            await asyncio.sleep(max(self.idle_s / 4, 0.05))
            self._shrink()

    def _shrink(self) -> None:
        now = self._now()
        baseline = self._baseline()
        for group in {w.group for w in self._workers.values()}:
            want = 0
            if group in baseline:
                want = self.workers if group == self._default_group else self.workers_per_domain
            live = [w for w in self._workers.values() if w.group == group
                    and w.state in ("starting", "ready") and not w.killed]
            idle = sorted((w for w in live if w.state == "ready" and w.queued == 0
                           and w.reserved == 0 and not w.pinned and not w.warm
                           and not w.lock.locked() and now - w.last_used >= self.idle_s),
                          key=lambda w: w.last_used)
            for worker in idle[:max(0, len(live) - want)]:
                self._retire(worker, f"idle for {now - worker.last_used:.0f} s", replace=False)


def _expire(waiter: asyncio.Future[Any], refusal: Callable[[], Exception]) -> None:
    if not waiter.done():
        waiter.set_exception(refusal())


def _log_layer(layer: LayerStatus) -> None:
    log.log(logging.INFO if layer.active else logging.WARNING, "sandbox layer %s: %s (%s)",
            layer.name, "active" if layer.active else "NOT ACTIVE", layer.detail)
