"""The server's records of the sandbox pool: plain data shared by the runtime's parts.

``_Worker`` is the server's handle on one worker process (its group, state, the call in flight,
the instances pinned to it, its channel's segments), ``_Call`` a request in flight on it,
``_Turn`` a worker's turn (a FIFO lock taken without a coroutine when free), ``_Waiters`` the
callers waiting for a worker (round robin by caller), ``_ClassPlan`` what the per-request path
needs to know about a node class (computed once per class). They hold no
policy: the pool (``_pool``), the call path (``_calls``) and streaming (``_streaming``) act on
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tensorline.server.manifest import NodeSpec
from tensorline.server.nodes import NodeEntry
from tensorline.server.runtime._base import ExecutionScope
from tensorline.server.runtime.sandbox import _isolation, _shm
from tensorline.server.runtime.sandbox._messages import CHATTER_BURST
from tensorline.server.runtime.sandbox._output import WorkerOutput

# A worker's interpreter, numpy and pydantic already use ~80 MiB of RLIMIT_DATA: a smaller
# declared cap would leave a worker that cannot run anything.
MIN_MEMORY_MB = 256

# (memory cap in MiB, trust domain): workers are started for, and only serve, one group.
_Group = tuple[int, str]

# How often a request that never reached a worker (it died first) is tried on another one.
_ATTEMPTS = 5


# A worker's name for a one-shot node class with its params: ((module, qualname), params key).
_ClassKey = tuple[tuple[str, str], str]


@dataclass(frozen=True, slots=True)
class _ClassPlan:
    """What the per-request path needs to know about a node class, computed once per class
    (it depends only on the registry entry and the runtime's settings)."""

    entry: NodeEntry
    group: _Group
    module: str
    # No initialize, neither reusable nor streaming: created lazily by its first call.
    lazy: bool
    # Lazy and without cleanup either: one ``run`` request creates, runs and drops it.
    oneshot: bool


class _Turn:
    """A worker's turn: a FIFO lock like ``asyncio.Lock``, but taking it when free is a plain
    call (no coroutine), and ``release`` hands it straight to the longest waiter (nobody can
    barge in between)."""

    __slots__ = ("_locked", "_waiters")

    def __init__(self) -> None:
        self._locked = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    def locked(self) -> bool:
        return self._locked

    def try_acquire(self) -> bool:
        if self._locked:
            return False
        self._locked = True
        return True

    async def acquire(self) -> None:
        if not self._locked:
            self._locked = True
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed the turn, then cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        if not self._locked:
            raise RuntimeError("release of a free turn")
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._locked = False


class _Waiters:
    """Callers waiting for a worker: one first-come-first-served line per caller, served round
    robin, so one caller's flood of slow calls cannot starve another caller's cheap one (a
    single FIFO would put the cheap call behind the whole flood). Waiters that gave up (done
    futures) are skipped lazily."""

    __slots__ = ("_lines",)

    def __init__(self) -> None:
        self._lines: OrderedDict[str, deque[asyncio.Future[Any]]] = OrderedDict()

    def __bool__(self) -> bool:
        return self.first() is not None

    def add(self, caller: str, waiter: asyncio.Future[Any], again: bool = False) -> None:
        """``again``: a waiter that was woken but found the worker taken by the time it ran
        keeps its place (front of its line, its line first in the round), or a caller's cheap
        call would lose its turn to the flood it was let ahead of."""
        line = self._lines.get(caller)
        if line is None:
            line = self._lines[caller] = deque()
        if again:
            line.appendleft(waiter)
            self._lines.move_to_end(caller, last=False)
        else:
            line.append(waiter)

    def first(self) -> asyncio.Future[Any] | None:
        """The waiter whose turn it is (left in place)."""
        lines = self._lines
        while lines:
            caller = next(iter(lines))
            line = lines[caller]
            while line and line[0].done():
                line.popleft()
            if line:
                return line[0]
            del lines[caller]
        return None

    def pop(self) -> asyncio.Future[Any] | None:
        """Take the waiter whose turn it is; its caller goes to the back of the round."""
        waiter = self.first()
        if waiter is not None:
            caller, line = self._lines.popitem(last=False)
            line.popleft()
            if line:
                self._lines[caller] = line
        return waiter

    def callers(self) -> int:
        return len(self._lines)


@dataclass(slots=True)
class _Batch:
    """A batch in flight (``runs`` or ``calls``): the values of the input sets reported so far
    (``size`` in all), and the scope each next input set's deadline is drawn from."""

    size: int
    scope: ExecutionScope
    values: list[Any] = field(default_factory=list)
    # Told the values of each report but the last (gathered calls: ``_gather``).
    on_report: Callable[[list[Any]], None] | None = None


@dataclass(slots=True)
class _Call:
    future: asyncio.Future[tuple[Any, ...]]
    spec: NodeSpec
    during: str
    iid: int
    deadline: float
    timer: asyncio.TimerHandle | None = None
    deadline_hit: bool = False
    abandoned: bool = False
    # Loop time the caller went away (what the kill's reason measures the grace from).
    abandoned_at: float = 0.0
    finished: bool = False
    # Called with the reply when it arrives after the caller was cancelled.
    on_abandoned: Callable[[tuple[Any, ...]], None] | None = None
    # A streaming session: "need"/"out" messages resolve ``future`` without ending the call.
    streaming: bool = False
    # The session stopped while the worker ran a step: its next "need" or "out" is answered
    # with the one "cancel" (set once that is sent).
    cancel_sent: bool = False
    on_event: Callable[[str, str, float], None] | None = None
    # A batch: its reports up to the last one resolve nothing but this.
    batch: _Batch | None = None
    # Loop time a node's single call was sent (0.0 for other requests): its duration tells
    # the placement whether the node's calls are short (see ``_placement``).
    sent_at: float = 0.0
    # Set while the call runs bound to the loop's CPU: what lets go if it turns slow, and
    # when it was sent bound.
    overrun: asyncio.TimerHandle | None = None
    bound_at: float = 0.0


# A one-shot call sent by ``_dispatch``: (worker, call, class key, class id, definition).
_Started = tuple["_Worker", _Call, _ClassKey, int, "tuple[str, str, str] | None"]


@dataclass(eq=False)
class _Worker:
    """The server's handle on one worker process."""

    wid: int
    cap_mb: int
    # Trust domain: "" for trusted nodes, the module name for an untrusted one. A worker only
    # ever hosts nodes of its own domain.
    domain: str
    scratch_dir: str
    inline_max: int
    process_id: int | None = None
    # A pidfd of the process: signals reach it, never a process that reused its pid.
    pidfd: int = -1
    uid: int | None = None
    # The descriptor whose flock leases ``uid`` on this host (see ``_uids``), -1 when none.
    uid_lease: int = -1
    output: WorkerOutput | None = None
    sock: socket.socket | None = None
    state: str = "starting"  # starting | ready | retiring | dead
    ready: asyncio.Future[None] | None = None
    dead: asyncio.Future[str] | None = None
    lock: _Turn = field(default_factory=_Turn)
    inflight: _Call | None = None
    queued: int = 0
    # Lazily created instances placed here whose first call has not been sent yet: the worker
    # is promised to them, not idle.
    reserved: int = 0
    # Streaming instances (non-reusable) placed here: such a session may hold the worker for
    # as long as it lasts, so nothing else is placed here while one is pinned (see ``_pick``).
    exclusive: set[int] = field(default_factory=set)
    warm: OrderedDict[str, asyncio.Future[int]] = field(default_factory=OrderedDict)
    pinned: set[int] = field(default_factory=set)
    kill_reason: str | None = None
    # SIGKILL sent: the worker may still look alive until its exit is seen, but nothing more
    # may be sent to it (the request would die with it, blamed on the kill's cause).
    killed: bool = False
    # Requests answered (see ``SandboxRuntime.max_calls``).
    calls: int = 0
    # The largest reply segment granted to the worker so far (see ``_Calls._grant_segment``).
    granted: int = 0
    # Its budget of messages beyond replies, when it was last charged, and the timer that
    # reads its socket again once the budget is spent (see ``_Calls._charge``).
    chatter: float = float(CHATTER_BURST)
    chatter_at: float = 0.0
    paused: asyncio.TimerHandle | None = None
    # Node code has run here (a request that creates an instance, runs one or imports an
    # untrusted module was sent); whether none had before the request in flight, and whether
    # the worker said it loaded a class during it (see ``_Calls._check_reply``, on ``import``).
    ran_node_code: bool = False
    untouched: bool = True
    loaded: bool = False
    # Sent "exit": nothing else may follow (the request would go to a worker that is leaving).
    exiting: bool = False
    cause: str = ""
    cpu_used: float = 0.0
    layers: list[_isolation.LayerReport] = field(default_factory=list)
    last_used: float = 0.0
    # Instances released by the server whose cleanup the worker has not run yet: sent with the
    # next request, or by a flush when the worker stays idle.
    releases: list[int] = field(default_factory=list)
    flush: asyncio.TimerHandle | None = None
    # Fires by the deadline of the call in flight (see ``_watch``).
    watchdog: asyncio.TimerHandle | None = None
    # Node modules this worker has imported successfully (their nodes may be created lazily).
    modules: set[str] = field(default_factory=set)
    # (node class, params key) -> the id the worker knows them by (see ``_run_once``).
    class_ids: dict[_ClassKey, int] = field(default_factory=dict)
    outbox: _shm.Outbox = field(default_factory=_shm.Outbox)
    inbox: _shm.Inbox = field(default_factory=_shm.Inbox)
    eof: bool = False

    @property
    def group(self) -> _Group:
        return (self.cap_mb, self.domain)

    @property
    def pid(self) -> int | None:
        return self.process_id

    @property
    def scratch_view(self) -> str:
        """The scratch dir as the server sees it: a worker's scratch is a tmpfs in its own
        mount namespace, visible from outside only through its ``/proc/<pid>/root``."""
        if self.process_id is None or self.state == "dead":
            return self.scratch_dir
        return f"/proc/{self.process_id}/root{self.scratch_dir}"

    @property
    def dedicated(self) -> bool:
        """A streaming instance owns the worker (it is pinned here and not released yet)."""
        if self.exclusive:
            self.exclusive &= self.pinned
        return bool(self.exclusive)

    @property
    def alive(self) -> bool:
        return self.state in ("ready", "retiring")

    def kill(self, reason: str | None) -> None:
        if self.state == "dead" or self.process_id is None:
            return
        if reason is not None and self.kill_reason is None:
            self.kill_reason = reason
        self.killed = True
        self.signal(signal.SIGKILL)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            if self.pidfd >= 0:
                signal.pidfd_send_signal(self.pidfd, sig)
            elif self.process_id is not None:
                os.kill(self.process_id, sig)


def _current_node(worker: _Worker) -> str | None:
    """The node a worker is running, to tag what it prints."""
    call = worker.inflight
    return None if call is None else call.spec.node_id


# The spec of a request that is not a node's (probe, exit, release): names the runtime.
class _NoSpec:
    node_id = "<runtime>"
    node_type = "<runtime>"


_NO_SPEC: Any = _NoSpec()
