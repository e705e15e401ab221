"""Which CPUs the server and a worker run on: one CPU for both while the sandbox is quiet.

A sandboxed call wakes its worker with the request, and the reply wakes the event loop. When
the woken thread lands on an idle CPU, the wake-up costs what waking that CPU costs. On a
virtual machine whose idle vCPUs halt at once (the guest kernel's ``haltpoll`` with
``guest_halt_poll_ns=0``, as on the machines the benchmarks ran on) that is a VM exit, ~40 µs
each way, against ~10 µs for a whole round trip between two processes on one CPU
(``python bench/bench_sandbox_hop.py --io``). So while the sandbox is quiet, the server's
threads and the worker of a short call are bound to the CPU the event loop sends the request
from: the worker runs there as soon as the loop waits, and its reply finds the loop's CPU
awake. The server's threads too, not only the loop's: a reply would otherwise wake the loop on
the other, idle, CPU (the worker still runs on this one when it sends it), and gRPC's own
threads hand each request and response to the loop.

Quiet means four things, and binding ends as soon as one fails:

* The call is of a node whose last call took less than ``SHORT_S``; no other request
  (initialization, cleanup, batches) binds a worker: the wake-up is noise against a longer
  call, and a node's code could start threads, which inherit its binding. Such a request
  leaves a worker already bound where it is (a stateful node's initialize, call and cleanup
  do not move it back and forth). A bound request still running ``SHORT_S`` after it was sent
  lets everything go at once (``overran``), so the event loop never shares its CPU for longer
  with a node that turned slow (or pretended to be quick).
* No two calls overlapped for ``QUIET_S``: when a call starts while another is in flight,
  everything is let go to all the server's CPUs, and stays so until ``QUIET_S`` has passed
  without an overlap, so that a loaded sandbox does not flap between the two.
* The server's threads used less than ``BIND_BELOW`` of a CPU over the last ``QUIET_S`` or so
  (``RELEASE_ABOVE`` once bound): one CPU is not enough for a busy server and a worker both
  (in-process nodes, many clients).
* Bound, the loop's thread waited for its CPU less than ``CONTENDED_SHARE`` of the time (its
  run delay, which the kernel keeps per thread), less the time its bound requests took (the
  loop waits while its own worker answers: that is the point). Something else on that CPU, which the loop
  cannot leave while bound, would show there: a thread a node left spinning (it inherited the
  binding), whenever and however it was started. Then everything is let go and nothing bound
  for ``BACKOFF_S``. A bound loop looks every ``WATCH_S`` even when no call comes, and an idle
  loop loses nothing meanwhile (a woken thread preempts a spinning one). After ``IDLE_S``
  without a sandboxed call it lets everything go and stops looking.

Letting go is thread by thread (``/proc/<pid>/task``): threads started while bound (a thread
pool's, a worker node's) inherited the binding. A thread bound otherwise (by the operator, a
library) is left alone. Processes the server starts while bound inherit it too; the sandbox's
launcher, which forks the workers, puts itself back on the server's CPUs when it starts
(``_prestart.SERVER_CPUS``).

Binding gives a worker nothing it did not have: its seccomp filter lets it place only its own
threads (``sched_setaffinity`` of 0), never the server's. It may leave the loop's CPU (its
loss), or put its threads on it at any time, bound or not (the run delay rule above lets the
loop go then; an unbound loop moves away by itself). The server places a worker by pid, only
while it holds it alive; but one that died unseen could have its pid reused before the server
learns of its death (the launcher reaps, then reports): that process would only be moved
between the server's CPUs. A placement that fails is skipped. If the server may not place its
workers (no ``CAP_SYS_NICE`` over workers of another uid), binding turns itself off.
``Settings.sandbox_co_locate`` turns it off by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import time
from collections.abc import Callable

from tensorline.server._prestart import SERVER_CPUS

log = logging.getLogger(__name__)

# No two calls overlapped for this long: the sandbox is quiet again and binds.
QUIET_S = 0.01
# A node whose last call took longer than this (wall time, request to reply) is not bound.
SHORT_S = 0.002
# The server's threads used more than this share of one CPU: one CPU is not enough for them
# and a worker both, and they are let go; they are bound again below the second share.
RELEASE_ABOVE = 0.85
BIND_BELOW = 0.7
# Bound, the loop's thread waited for its CPU more than this share of the time (its run delay,
# ``/proc/thread-self/schedstat``): something it cannot leave shares that CPU (a thread a node
# started while bound, say). Everything is let go, and nothing bound for ``BACKOFF_S``.
CONTENDED_SHARE = 0.3
BACKOFF_S = 1.0
# How often a bound loop looks at its run delay when no call comes to make it look; after
# ``IDLE_S`` without a sandboxed call it lets everything go and stops looking.
WATCH_S = 0.05
IDLE_S = 1.0
# Node types whose last call time is kept; past this many the record starts over.
MAX_NODE_TYPES = 4096


def _current_cpu_function() -> Callable[[], int] | None:
    """glibc's ``sched_getcpu`` (a vDSO read, no system call), or None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sched_getcpu
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int
    function.argtypes = []
    return function  # type: ignore[no-any-return]


class CpuPlacement:
    """Binds the event loop and the worker of a short call to one CPU while the sandbox is
    quiet (see the module's docstring). Called on the event loop's thread only."""

    def __init__(self, enabled: bool) -> None:
        # The server's CPUs as it started (not its thread's: another runtime may bind it).
        self._cpus = frozenset(SERVER_CPUS)
        self._current_cpu = _current_cpu_function()
        self.enabled = enabled and len(self._cpus) > 1 and self._current_cpu is not None
        # Bound workers (pid -> CPU), and the CPU the loop's thread is bound to.
        self._bound: dict[int, int] = {}
        self._loop_cpu: int | None = None
        self._overlapped_at = float("-inf")
        self._durations: dict[str, float] = {}
        # The server's CPU time, the loop's run delay and the loop time of the last look at
        # them (``_busy``); no binding before ``_backoff_until``.
        self._sampled_at = float("-inf")
        self._cpu_at = 0.0
        self._delay_at = 0
        # Seconds bound requests took, in all and at the last look: the loop waits for its CPU
        # while its own worker runs one, which is no contention.
        self._bound_time = 0.0
        self._bound_time_at = 0.0
        self._server_busy = False
        self._backoff_until = float("-inf")
        self._watch: asyncio.TimerHandle | None = None
        self._sent_at = float("-inf")
        if self.enabled and _run_delay() is None:
            # Without it a thread that shares the loop's CPU could go unseen: bind nothing.
            log.info("sandbox workers stay where the scheduler puts them: no schedstat")
            self.enabled = False

    @property
    def bound(self) -> dict[int, int]:
        """Bound workers: pid -> CPU."""
        return dict(self._bound)

    @property
    def loop_cpu(self) -> int | None:
        """The CPU the event loop's thread is bound to, if it is."""
        return self._loop_cpu

    def is_short(self, node_type: str) -> bool:
        """Whether ``node_type``'s last call was short (a node never called is not)."""
        return self._durations.get(node_type, SHORT_S) < SHORT_S

    def record(self, node_type: str, seconds: float) -> None:
        """A call of ``node_type`` took ``seconds``, request to reply."""
        if len(self._durations) >= MAX_NODE_TYPES and node_type not in self._durations:
            self._durations.clear()
        self._durations[node_type] = seconds

    def before_send(self, pid: int, short: bool, overlapping: bool, now: float) -> bool:
        """Place the worker ``pid`` before a request wakes it: ``short`` is a call of a node
        whose last call was short, ``overlapping`` that other calls are in flight. True when
        the request runs bound: past ``SHORT_S`` the caller lets everything go (``overran``).
        Only a short call binds a worker; another request (an initialize, a cleanup) leaves a
        bound worker where it is, under the same ``SHORT_S`` watch, rather than moving it and
        back for every request of a stateful node."""
        if not self.enabled:
            return False
        self._sent_at = now
        if overlapping or self._busy(now):
            if overlapping:
                self._overlapped_at = now
            if self._bound or self._loop_cpu is not None:
                self.release_all()
            return False
        if now - self._overlapped_at < QUIET_S or now < self._backoff_until:
            if pid in self._bound:
                self.release(pid)
            return False
        if not short:
            return pid in self._bound
        assert self._current_cpu is not None
        cpu = self._loop_cpu if self._loop_cpu is not None else self._current_cpu()
        if cpu < 0:
            return False
        if self._bound.get(pid) == cpu:
            return True
        try:
            if self._loop_cpu is None:
                # The server's threads too: a reply would otherwise wake the loop on another,
                # idle, CPU (the worker still runs on this one when its reply is sent), and
                # gRPC's own threads hand each request and response to the loop.
                os.sched_setaffinity(0, (cpu,))
                self._loop_cpu = cpu
                _move_threads("/proc/self/task", self._cpus, frozenset((cpu,)))
                self._watch = asyncio.get_running_loop().call_later(WATCH_S, self._look)
            os.sched_setaffinity(pid, (cpu,))
        except OSError as exc:
            self._bound.pop(pid, None)
            if exc.errno != errno.ESRCH:
                # Not allowed here (EPERM: workers of another uid and no CAP_SYS_NICE; EINVAL:
                # the CPU left the server's cpuset): stop trying.
                log.info("sandbox workers stay where the scheduler puts them: %s", exc)
                self.release_all()
                self.enabled = False
            return False
        self._bound[pid] = cpu
        return True

    def bound_request_ended(self, seconds: float) -> None:
        """A request sent bound got its reply ``seconds`` after it was sent."""
        self._bound_time += seconds

    def overran(self, node_type: str | None) -> None:
        """A bound request is still running ``SHORT_S`` after it was sent: let everything go
        (the loop must not share its CPU with a node that turned slow). If it was a call of
        ``node_type``, the node's calls count as long from now on."""
        if node_type is not None:
            self.record(node_type, SHORT_S)
        self.release_all()

    def _busy(self, now: float) -> bool:
        """Whether one CPU is not enough for the server and a worker, over the last
        ``QUIET_S`` or so: the server's threads used too much of a CPU (``RELEASE_ABOVE`` when
        bound, ``BIND_BELOW`` when not), or, bound, the loop waited for its CPU too long."""
        if now - self._sampled_at >= QUIET_S:
            cpu = time.process_time()
            delay = _run_delay() or 0
            if self._sampled_at > float("-inf"):
                window = now - self._sampled_at
                # Bound, the server shares one CPU with its worker: let go when it nears that
                # CPU's whole; bind again only well below (no flapping at the edge).
                share = RELEASE_ABOVE if self._loop_cpu is not None else BIND_BELOW
                self._server_busy = cpu - self._cpu_at > share * window
                # Waiting while its own bound worker answers is the point of binding: only the
                # rest of the wait is contention.
                waited = (delay - self._delay_at) / 1e9 - (self._bound_time - self._bound_time_at)
                if self._loop_cpu is not None and waited > CONTENDED_SHARE * window:
                    self._server_busy = True
                    self._backoff_until = now + BACKOFF_S
            self._sampled_at, self._cpu_at, self._delay_at = now, cpu, delay
            self._bound_time_at = self._bound_time
        return self._server_busy

    def _look(self) -> None:
        """Every ``WATCH_S`` while the loop is bound: let go if one CPU is no longer enough,
        even when no call comes to look, or once the sandbox has been idle ``IDLE_S`` (an idle
        server keeps no timer, and its other work runs unbound)."""
        self._watch = None
        if self._loop_cpu is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._busy(now) or now - self._sent_at > IDLE_S:
            self.release_all()
        else:
            self._watch = loop.call_later(WATCH_S, self._look)

    def release(self, pid: int) -> None:
        """Let the worker ``pid`` and every thread of it run on all the server's CPUs."""
        cpu = self._bound.pop(pid, None)
        if cpu is not None:
            _move_threads(f"/proc/{pid}/task", frozenset((cpu,)), self._cpus)

    def release_all(self) -> None:
        """Let every bound worker go, and the loop's thread with the threads it started while
        bound (they inherited its binding: a thread pool's, say)."""
        for pid in list(self._bound):
            self.release(pid)
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._loop_cpu is not None:
            cpu, self._loop_cpu = self._loop_cpu, None
            _move_threads("/proc/self/task", frozenset((cpu,)), self._cpus)

    def forget(self, pid: int) -> None:
        """The worker ``pid`` is gone: its pid may name another process from now on."""
        self._bound.pop(pid, None)


def _move_threads(tasks: str, before: frozenset[int], after: frozenset[int]) -> None:
    """Threads under ``tasks`` that may run on exactly ``before`` may run on ``after`` instead
    (a thread placed otherwise was placed by someone else, and stays)."""
    try:
        threads = [int(tid) for tid in os.listdir(tasks)]
    except OSError:
        return
    for tid in threads:
        with contextlib.suppress(OSError):
            if os.sched_getaffinity(tid) == before:
                os.sched_setaffinity(tid, after)


def _run_delay() -> int | None:
    """Nanoseconds the calling thread has spent waiting for a CPU (None where the kernel does
    not say)."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as stat:
            return int(stat.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
