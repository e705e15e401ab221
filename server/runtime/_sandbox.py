"""The sandboxed runtime: nodes run in a supervised pool of isolated worker processes.

Design (the measured facts behind it are in shared/notes/sandbox.md):

* Workers are forked by the multiprocessing ``forkserver`` (numpy, pydantic and the worker
  module preloaded, BLAS limited to one thread), never from the server, which holds gRPC state.
  ``start()`` launches the pool; a request never waits for a spawn once the pool is warm, except
  to replace a dead worker or to start the first worker of a group not started with the pool.
* Workers come in groups, and a worker only ever serves its group ``(memory cap, trust
  domain)``:
  - memory caps are per process (RLIMIT_DATA), so a worker is started for one cap: the node's
    declared ``traits.memory_mb`` (at least ``MIN_MEMORY_MB``: the interpreter, numpy and
    pydantic take ~80 MiB of it), else ``memory_mb_default``;
  - all trusted nodes share one domain; each untrusted module is a domain of its own, so
    untrusted code never shares a process (and so memory: inputs, outputs, loaded models) with
    nodes of another module.
  ``start()`` starts ``workers`` workers for the default group (default cap, trusted) and
  ``workers_per_domain`` for each module named in ``domains`` (pass the operator's untrusted
  modules); these groups are kept at strength. Other groups are started on first use and kept,
  up to ``max_workers`` in total, beyond which an idle worker of another group is retired.
* A worker hosts any number of node instances of its group and runs one call at a time (calls
  on a worker are serialized by a lock; instances are pinned to the worker that holds them).
  A fresh instance goes to an idle worker (or waits, first come first served, for one to free
  up); one without ``initialize()`` is created by its first call and its cleanup rides with the
  worker's next request, so a plain node costs one round trip per request. One with neither
  ``initialize()`` nor ``cleanup()`` (the common case: "one-shot") is not even kept: ``call``
  sends one ``run`` request that creates it, runs it and drops it, naming its class and params
  by a small id the server assigned per worker the first time (``_run_once``), so nothing is
  pinned, reserved or released for it. Reusable nodes stay
  warm per worker: a call prefers an idle worker that already holds the instance, else
  initializes it on an idle worker, so a model loads at most once per worker.
* The event loop never blocks: each worker's control socket and exit sentinel are watched with
  ``loop.add_reader``; the reply resolves the waiting future directly in the callback (measured
  faster than a reader thread handing over with ``call_soon_threadsafe``, which costs a second
  wake-up per reply: ``bench/bench_sandbox_hop.py --io``).
* The per-request path is kept short: its Python work on both sides, and the two wake-ups
  (cheap in a tight ping-pong, ~10 us a round trip, but each costs tens of us when the other
  CPU has gone idle, as between calls at low load on a small VM; docs/performance-runtimes.md),
  are the hop's cost. A plain node whose module the chosen worker has imported is placed by
  ``acquire`` without an await; an idle worker is the most recently used one (at low load one
  worker keeps serving with warm caches); under load a one-shot call waits for an idle worker
  in the same first-come-first-served line as ``_pool_change``, and the reply that frees a
  worker sends the first waiting call's request from its callback (``_dispatch``: no loop
  iteration before the send, and the worker gets its next request before it goes back to
  sleep) instead of the general path with its instance bookkeeping; what depends only on the
  node class (its group, whether it is one-shot) is computed once per class (``_ClassPlan``); a
  worker's turn (``_Turn``) is taken by a plain call when free; one watchdog timer per worker,
  re-armed only when a call is due before it, enforces the deadlines instead of a timer per
  call; one message is read per readable callback.
* Supervision: every call has a wall-clock deadline (the execution's deadline, the node's
  timeout, else ``call_timeout_s``); past it the worker is killed and replaced and
  ``DeadlineExceeded`` names the node. Once a worker is sent SIGKILL nothing more is sent to it
  (a request would die with it, blamed on the kill's cause). A dead worker fails only its
  in-flight call with ``SandboxFailure`` and a readable cause; idle instances pinned to it are
  re-created on their next call, and requests that had not reached it go to another worker. A
  cancelled call is signalled to the worker (SIGUSR1 sets ``context.cancelled``) and the worker
  is killed if it does not return within ``cancel_grace_s``.
* Streaming nodes (``stream``): the generator runs in the worker, driven by the server one
  step at a time (the worker asks for a chunk only when the generator pulls, and waits for
  the server's go-ahead after each output: one output in flight at most). A fresh streaming
  instance gets a worker of its own (no other instance pinned there; a new worker is started
  within ``max_workers`` if none is free) and holds its lock for the whole session, so a
  session with sandboxed plain and streaming nodes of one group cannot deadlock on one worker.
  Each step has the node's deadline; waiting for input or for the consumer does not count.
  Stopping a stream early sends a cancel (or SIGUSR1 while the node runs) and kills the worker
  after ``cancel_grace_s``; ``NodeContext.report`` calls are forwarded to the session.
* Error classification for the executor's fallback decision: the node's own exceptions are
  ``NodeFailed``; failures of the sandbox are ``WorkerFailure`` (a ``SandboxFailure``) with
  ``during`` (``initialize`` / ``process``), a ``kind`` and ``fallback_eligible``: true for a
  blocked syscall surfacing as EPERM/EACCES, a MemoryError under the cap, an import that fails
  only in the worker, and any failure during initialize (crashes included).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections import OrderedDict, deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tensorline.server._errors import (
    DeadlineExceeded,
    LayerMissing,
    NodeFailed,
    SandboxFailure,
    ServiceUnavailable,
)
from tensorline.server.manifest import NodeSpec
from tensorline.server.nodes import Emit, NodeEntry
from tensorline.server.nodes._catalogue import CatalogueInvalid, NodeDescription, parse_catalogue
from tensorline.server.runtime._base import (
    ExecutionScope,
    LayerStatus,
    NodeInstance,
    Runtime,
    within_node_timeout,
)
from tensorline.server.runtime.sandbox import Launcher, _isolation, _paths, _shm, minimal_environment
from tensorline.server.runtime.sandbox._output import WorkerOutput
from tensorline.server.runtime.sandbox._worker import (
    MAX_KINDS,
    SEGMENT_GRANTED,
    SEGMENT_REFUSED,
    WorkerConfig,
)

log = logging.getLogger(__name__)

# Workers get uids from this range when the server runs as root: one uid per worker, so file
# permissions, signals and RLIMIT_NPROC separate workers from the server and from each other.
WORKER_UID_BASE = 1_900_000
WORKER_UID_COUNT = 65_536


class ModuleUnavailable(Exception):
    """An untrusted module could not be imported or described in its sandboxed worker."""

    def __init__(self, module: str, cause: str) -> None:
        super().__init__(f"untrusted module {module} could not be loaded in the sandbox: {cause}")
        self.module = module
        self.cause = cause


class WorkerFailure(SandboxFailure):
    """A ``SandboxFailure`` with a machine-readable ``kind``, for the executor's fallback.

    Kinds: ``permission`` (a blocked syscall surfaced as EPERM/EACCES), ``memory`` (MemoryError
    under the cap), ``import`` (the node class cannot be loaded in the worker), ``crash`` (the
    worker died: signal or exit), ``cpu`` (SIGXCPU), ``protocol`` (the worker broke the control
    protocol), ``unavailable`` (no worker could be started).
    """

    # An import the worker reports as failed may itself have hit the sandbox (module code that
    # opens a socket or a file outside the allow-list): that is a denial, not a load failure.
    _DENIAL_MARKS = ("PermissionError", "[Errno 1]", "[Errno 13]", "Operation not permitted",
                     "Permission denied", "MemoryError")

    def __init__(self, node_id: str, cause: str, *, during: str, kind: str) -> None:
        super().__init__(node_id, cause, during=during, kind=kind)

    @property
    def fallback_eligible(self) -> bool:
        """Only when the worker could not host the node at all (no worker, a class that cannot
        be loaded there, values that cannot cross); never for what the sandbox denied or
        stopped, whether during initialize or process."""
        if self.kind == "import" and any(mark in self.cause for mark in self._DENIAL_MARKS):
            return False
        return super().fallback_eligible


# A worker's interpreter, numpy and pydantic already use ~80 MiB of RLIMIT_DATA: a smaller
# declared cap would leave a worker that cannot run anything.
MIN_MEMORY_MB = 256

# (memory cap in MiB, trust domain): workers are started for, and only serve, one group.
_Group = tuple[int, str]

# How often a request that never reached a worker (it died first) is tried on another one.
_ATTEMPTS = 5


# A worker's name for a one-shot node class with its params: ((module, qualname), params key).
_KindKey = tuple[tuple[str, str], str]


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


class _WorkerGone(Exception):
    """The worker died before the request could be sent (the caller may re-create and retry)."""


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
    finished: bool = False
    # Called with the reply when it arrives after the caller was cancelled.
    on_abandoned: Callable[[tuple[Any, ...]], None] | None = None
    # A streaming session: "need"/"out" messages resolve ``future`` without ending the call.
    streaming: bool = False
    on_event: Callable[[str, str, float], None] | None = None


# A one-shot call sent by ``_dispatch``: (worker, call, class key, class id, definition).
_Started = tuple["_Worker", _Call, _KindKey, int, "tuple[str, str, str] | None"]


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
    kinds: dict[_KindKey, int] = field(default_factory=dict)
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


class SandboxInstance(NodeInstance):
    """A node instance living in a worker (``iid`` in worker ``worker``)."""

    def __init__(self, spec: NodeSpec, scope: ExecutionScope, runtime: SandboxRuntime,
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

    def stream(self, chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
        return self._runtime._stream(self, chunks)


def _init_request(instance: SandboxInstance) -> tuple[str, str, str, str, str] | None:
    """What the worker needs to create a not-yet-initialized instance with its first request:
    where the class lives, its validated params, node and execution ids (None once created)."""
    if instance.initialized:
        return None
    spec = instance.spec
    module, qualname = spec.entry.class_ref
    return (module, qualname, spec.params_key, spec.node_id, instance.scope.execution_id)


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


class SandboxRuntime(Runtime):
    """Nodes run in isolated worker processes; see the module docstring."""

    name: ClassVar[str] = "sandbox"

    def __init__(
        self,
        *,
        workers: int = 2,
        max_workers: int | None = None,
        memory_mb_default: int = 2048,
        domains: Sequence[str] = (),
        workers_per_domain: int = 1,
        cpu_seconds: float = 60.0,
        cpu_seconds_lifetime: float = 3600.0,
        nofile: int = 256,
        fsize_mb: int = 1024,
        scratch_root: str | None = None,
        call_timeout_s: float = 300.0,
        init_timeout_s: float = 120.0,
        cancel_grace_s: float = 5.0,
        start_timeout_s: float = 60.0,
        warm_per_worker: int = 8,
        inline_max_bytes: int = _shm.DEFAULT_INLINE_MAX,
        max_message_bytes: int = 1 << 30,
        namespaces: bool = True,
        landlock: bool = True,
        seccomp: bool = True,
        devices: Sequence[str] = (),
        threads: int = 64,
        scratch_mb: int = 512,
        read_paths: Sequence[str] = (),
        environment: Sequence[str] = (),
        separate_uids: bool = True,
        max_calls: int = 0,
        recycle_rss_mb: int | None = None,
        probe_interval_s: float = 30.0,
        required_layers: Sequence[str] = (),
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if memory_mb_default < MIN_MEMORY_MB:
            raise ValueError(f"memory_mb_default must be at least {MIN_MEMORY_MB} MiB")
        self.workers = workers
        self.memory_mb_default = memory_mb_default
        # Untrusted modules whose workers start with the pool (others start on first use).
        self.domains = tuple(dict.fromkeys(domains))
        self.workers_per_domain = max(1, workers_per_domain)
        self._default_group: _Group = (memory_mb_default, "")
        baseline = workers + self.workers_per_domain * len(self.domains)
        # Room for two workers of groups started on demand (node-specific caps, other modules).
        self.max_workers = max(max_workers if max_workers is not None else baseline + 2,
                               baseline)
        self.cpu_seconds = cpu_seconds
        self.cpu_seconds_lifetime = max(cpu_seconds_lifetime, cpu_seconds * 2)
        self.nofile = nofile
        # Per file in the scratch dir (reply segments are memfds the server makes).
        self.fsize_mb = fsize_mb
        self.threads = threads
        self.scratch_mb = scratch_mb
        # Operator-named paths workers may read, and server environment variables they get.
        self.extra_read_paths = tuple(read_paths)
        self.environment = tuple(environment)
        self.separate_uids = separate_uids
        # Recycling: a worker is replaced after ``max_calls`` requests (0: never), when its
        # peak RSS passes ``recycle_rss_mb`` (default: 3/4 of its cap), when it runs low on
        # descriptors, or when an idle worker fails a probe every ``probe_interval_s``.
        self.max_calls = max_calls
        self.recycle_rss_mb = recycle_rss_mb
        self.probe_interval_s = probe_interval_s
        self._recycles = 0
        # Layers without which untrusted code is refused (see ``_require_layers``).
        self.required_layers = tuple(required_layers)
        self._prober: asyncio.Task[None] | None = None
        self._read_paths: tuple[str, ...] = ()
        self._list_paths: tuple[str, ...] = ()
        self._uids_usable = False
        self.call_timeout_s = call_timeout_s
        self.init_timeout_s = init_timeout_s
        self.cancel_grace_s = cancel_grace_s
        self.start_timeout_s = start_timeout_s
        self.warm_per_worker = warm_per_worker
        self.inline_max_bytes = inline_max_bytes
        # Largest reply a worker may send (its segments are capped at twice this); match the
        # server's tensor limit.
        self.max_message_bytes = max_message_bytes
        self._isolation = {"namespaces": namespaces, "landlock": landlock, "seccomp": seccomp}
        # Device nodes (globs) workers may open read/write: GPU nodes run here by default.
        self.devices = tuple(devices)
        self._scratch_root_arg = scratch_root
        self._scratch_root = ""
        self._owns_scratch_root = False
        self._workers: dict[int, _Worker] = {}
        self._wids = itertools.count(1)
        self._iids = itertools.count(1)
        self._kids = itertools.count(1)
        # By NodeEntry.class_ref: untrusted nodes have no class object in the server.
        self._class_plans: dict[tuple[str, str], _ClassPlan] = {}
        self._background: set[asyncio.Future[Any]] = set()
        self._layers: list[LayerStatus] = []
        self._launcher: Launcher | None = None
        self._by_pid: dict[int, _Worker] = {}
        self._started = False
        self._closed = False
        self._spawn_failures = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        # Waiters for a worker to become idle (``_pool_change``, ``_wait_for_run``); those of
        # one-shot calls are in ``_runs`` with what ``_dispatch`` needs to send their request.
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._runs: dict[asyncio.Future[Any], tuple[_ClassPlan, NodeSpec, ExecutionScope,
                                                    Mapping[str, Any]]] = {}
        self._restarts = 0

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        if self._scratch_root_arg:
            self._scratch_root = os.path.join(self._scratch_root_arg,
                                              f"tensorline-sandbox-{os.getpid()}")
        else:
            self._scratch_root = os.path.join(tempfile.gettempdir(),
                                              f"tensorline-sandbox-{os.getpid()}")
        os.makedirs(self._scratch_root, mode=0o700, exist_ok=True)
        self._owns_scratch_root = True
        self._read_paths, self._list_paths = _paths.worker_paths(self.extra_read_paths)
        # Workers get uids of their own when the server is root (each worker then checks that
        # it can still read what it needs, and reports the layer).
        self._uids_usable = self.separate_uids and os.geteuid() == 0
        if self._uids_usable:
            # Workers of their own uid must reach their scratch dirs (not list the others).
            os.chmod(self._scratch_root, 0o711)
        self._launcher = Launcher(minimal_environment(self.environment), self._on_exit,
                                  self.start_timeout_s)
        await self._launcher.ensure_running()
        results = await asyncio.gather(
            *(self._spawn(group) for group in self._baseline() for _ in range(
                self.workers if group == self._default_group else self.workers_per_domain)),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if len(failures) == len(results):
            await self.shutdown()
            raise RuntimeError(f"no sandbox worker could start: {failures[0]}") from failures[0]
        for failure in failures:
            log.error("a sandbox worker failed to start: %s", failure)
        if self.probe_interval_s > 0:
            self._prober = asyncio.ensure_future(self._probe_idle_workers())
        missing = self.missing_layers()
        if missing and self.domains:
            log.error("untrusted node modules will be refused: required sandbox layer(s) %s "
                      "not active on this host", ", ".join(missing))

    def missing_layers(self) -> list[str]:
        """Required layers (``required_layers``) that are not active on every live worker."""
        active = {layer.name for layer in self._layers if layer.active}
        return [name for name in self.required_layers if name not in active]

    def _require_layers(self, domain: str, subject: str) -> None:
        """Untrusted code runs only with every layer the operator requires for it."""
        if domain and self.required_layers:
            missing = self.missing_layers()
            if missing:
                raise LayerMissing(subject, missing)

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
            await self._request(worker, ("probe",), None, "probe", 0,
                                 self._now() + self.cancel_grace_s)

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        self._notify(everyone=True)
        workers = list(self._workers.values())

        async def stop(worker: _Worker) -> None:
            if worker.state == "starting" and worker.ready is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(worker.ready), self.start_timeout_s)
            if worker.alive and not worker.lock.locked():
                # Idle: let it run the cleanup of its warm instances, briefly.
                worker.kill_reason = worker.kill_reason or "server shutting down"
                with contextlib.suppress(Exception):
                    await self._request(worker, ("exit",), None, "cleanup", 0,
                                        self._now() + 2.0)
            worker.kill("server shutting down")
            if worker.dead is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(worker.dead), 10.0)

        await asyncio.gather(*(stop(w) for w in workers), return_exceptions=True)
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        # Workers that were still starting when the loop above began.
        late = [w for w in self._workers.values() if w not in workers]
        await asyncio.gather(*(stop(w) for w in late), return_exceptions=True)
        for worker in list(self._workers.values()):
            self._forget(worker)
        if self._launcher is not None:
            await self._launcher.close()
        if self._owns_scratch_root and self._scratch_root:
            shutil.rmtree(self._scratch_root, ignore_errors=True)

    def healthy(self) -> bool:
        if not self._started or self._closed or self._spawn_failures >= 3:
            return False
        return any(w.state in ("ready", "starting") for w in self._workers.values())

    def layers(self) -> list[LayerStatus]:
        return list(self._layers)

    def stats(self) -> dict[str, float]:
        return {"worker_restarts": float(self._restarts),
                "worker_recycles": float(self._recycles),
                "workers": float(sum(1 for w in self._workers.values() if w.alive))}

    @property
    def launcher_pid(self) -> int | None:
        """The process that forks the workers (their parent)."""
        return None if self._launcher is None else self._launcher.pid

    def scratch_views(self) -> list[str]:
        """Each live worker's scratch dir as the server sees it (diagnostics, tests)."""
        return [w.scratch_view for w in self._workers.values() if w.alive]

    def worker_pids(self) -> list[int]:
        """Pids of the live workers (for tests and diagnostics)."""
        return [w.pid for w in self._workers.values() if w.pid is not None and w.alive]

    # --- spawning and death -------------------------------------------------------------------

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    async def _spawn(self, group: _Group) -> _Worker:
        """Start a worker and wait until it is ready. The start itself is shielded: a caller
        that gives up does not leave a half-started process behind (the worker joins the pool).
        """
        if self._closed:
            raise ServiceUnavailable("the sandbox runtime is shut down")
        task = self._track(asyncio.ensure_future(self._start_worker(group)))
        return await asyncio.shield(task)  # type: ignore[no-any-return]

    async def _start_worker(self, group: _Group) -> _Worker:
        cap_mb, domain = group
        loop = asyncio.get_running_loop()
        wid = next(self._wids)
        scratch = os.path.join(self._scratch_root, f"w{wid}")
        os.makedirs(scratch, mode=0o700, exist_ok=True)
        # The worker takes this uid if it can still read what it needs as it (and then owns
        # its scratch dir); it reports the outcome as the "unprivileged uid" layer.
        uid = WORKER_UID_BASE + wid % WORKER_UID_COUNT if self._uids_usable else None
        worker = _Worker(wid=wid, cap_mb=cap_mb, domain=domain, scratch_dir=scratch,
                         inline_max=self.inline_max_bytes, uid=uid)
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

    def _on_readable(self, worker: _Worker) -> None:
        # One message per callback: the selector is level-triggered, so a second queued message
        # calls back again, and the usual single reply saves a recvmsg that would only fail.
        sock = worker.sock
        if sock is None or worker.state == "dead":
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
        if (type(message) is tuple and len(message) == 3 and message[0] == "ok"
                and type(message[2]) is float and call is not None and not call.streaming):
            # The usual reply, checked first: ("ok", value, cpu_used) to a call.
            worker.cpu_used = message[2]
            self._finish(worker, call)
            if not call.future.done():
                call.future.set_result(message)
            elif call.on_abandoned is not None:
                call.on_abandoned(message)
            return
        if not isinstance(message, tuple) or not message or not isinstance(message[0], str):
            self._misbehaved(worker, "malformed reply")
            return
        if message[0] == "ready" and worker.state == "starting":
            try:
                worker.layers = [(str(n), bool(a), str(d)) for n, a, d in message[1]]
            except (TypeError, ValueError):
                self._misbehaved(worker, "malformed ready message")
                return
            worker.state = "ready"
            self._record_layers(worker)
            if worker.ready is not None and not worker.ready.done():
                worker.ready.set_result(None)
            self._notify(everyone=True)
            return
        if message[0] == "unhealthy" and len(message) == 2:
            self._recycle(worker, str(message[1])[:300])
            return
        if message[0] == "segment" and len(message) == 2 and type(message[1]) is int:
            self._grant_segment(worker, message[1])
            return
        if message[0] == "event":
            # NodeContext.report during a stream; dropped when nobody listens any more.
            if call is not None and call.on_event is not None and len(message) == 4:
                with contextlib.suppress(Exception):
                    call.on_event(str(message[1])[:100], str(message[2])[:4000],
                                  float(message[3]))
            return
        if call is None:
            self._misbehaved(worker, "reply without a request")
            return
        if call.streaming and message[0] in ("need", "out"):
            self._on_stream_message(worker, call, message)
            return
        if len(message) >= 3 and isinstance(message[-1], float | int):
            worker.cpu_used = float(message[-1])
        self._finish(worker, call)
        if not call.future.done():
            call.future.set_result(message)
        elif call.on_abandoned is not None:
            call.on_abandoned(message)

    def _grant_segment(self, worker: _Worker, size: int) -> None:
        """A worker's reply needs a larger segment; it may not make memfds itself."""
        sock = worker.sock
        if sock is None:
            return
        if not 0 < size <= self.max_message_bytes * 2:
            with contextlib.suppress(OSError):
                sock.send(SEGMENT_REFUSED)
            return
        fd = _shm.new_segment_fd(size, f"tensorline-w{worker.wid}-out")
        try:
            sock.sendmsg([SEGMENT_GRANTED], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                              array.array("i", [fd]))])
        except OSError as exc:
            self._misbehaved(worker, f"segment could not be sent ({exc})")
        finally:
            os.close(fd)

    def _recycle(self, worker: _Worker, why: str) -> None:
        """Replace a worker that is broken or worn before it gets another call (the call in
        flight, if any, still completes there)."""
        if worker.state != "ready":
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
            return f"worker killed by signal {sig} ({_signal_name(sig)})"
        if code == 70:
            return "worker exited: the server went away"
        return f"worker exited with status {code}"

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

    def _forget(self, worker: _Worker) -> None:
        loop = self._loop
        if worker.watchdog is not None:
            worker.watchdog.cancel()
            worker.watchdog = None
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

    def _replace(self, group: _Group) -> None:
        """Keep the groups started by ``start()`` at strength; others restart on demand."""
        if group not in self._baseline():
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
        async def spawn() -> None:
            try:
                await self._spawn(group)
            except Exception as exc:
                if not self._closed:
                    log.error("could not start a replacement sandbox worker: %s", exc)

        self._track(asyncio.ensure_future(spawn()))

    def _track(self, future: asyncio.Future[Any]) -> asyncio.Future[Any]:
        self._background.add(future)

        def done(f: asyncio.Future[Any]) -> None:
            self._background.discard(f)
            if not f.cancelled():
                f.exception()

        future.add_done_callback(done)
        return future

    def _record_layers(self, worker: _Worker) -> None:
        """A layer counts as active only when every live worker has it; changes are logged."""
        merged: dict[str, LayerStatus] = {}
        for w in [*(w for w in self._workers.values() if w.alive and w is not worker), worker]:
            for name, active, detail in w.layers:
                known = merged.get(name)
                if known is None or (known.active and not active):
                    merged[name] = LayerStatus(name, active, detail)
        layers = list(merged.values())
        if layers != self._layers:
            for layer in layers:
                if layer not in self._layers:
                    log.log(logging.INFO if layer.active else logging.WARNING,
                            "sandbox layer %s: %s (%s)", layer.name,
                            "active" if layer.active else "NOT ACTIVE", layer.detail)
            self._layers = layers

    def _retire(self, worker: _Worker, why: str, *, replace: bool = True) -> None:
        """Stop giving the worker new work; end it (running its cleanups) once it is idle."""
        if worker.state != "ready":
            return
        worker.state = "retiring"
        worker.kill_reason = "retired"
        log.info("retiring sandbox worker %s: %s", worker.wid, why)

        async def retire() -> None:
            with contextlib.suppress(Exception):
                await self._request(worker, ("exit",), None, "cleanup", 0,
                                    self._now() + self.cancel_grace_s)
            worker.kill("retired")

        self._track(asyncio.ensure_future(retire()))
        if replace:
            self._replace(worker.group)

    # --- choosing a worker --------------------------------------------------------------------

    def _group_of(self, spec: NodeSpec) -> _Group:
        return self._class_plan(spec.entry).group

    def _class_plan(self, entry: NodeEntry) -> _ClassPlan:
        plan = self._class_plans.get(entry.class_ref)
        if plan is None or plan.entry is not entry:
            declared = entry.traits.memory_mb
            cap = max(int(declared), MIN_MEMORY_MB) if declared else self.memory_mb_default
            lazy = not (entry.reusable or entry.streaming or entry.has_initialize)
            plan = self._class_plans[entry.class_ref] = _ClassPlan(
                entry=entry, group=(cap, "" if entry.trusted else entry.module),
                module=entry.class_module, lazy=lazy, oneshot=lazy and not entry.has_cleanup)
        return plan

    async def _pick(self, group: _Group, exclusive: bool = False) -> _Worker:
        """An idle worker of ``group``; ``exclusive`` (a streaming instance, which may hold
        its worker for a whole session): one hosting no other instance, else a new worker
        (within ``max_workers``), else wait for one to free up."""
        while True:
            if self._closed:
                raise ServiceUnavailable("the sandbox runtime is shut down")
            if not exclusive and (idle_worker := self._idle(group)) is not None:
                return idle_worker
            ready = [w for w in self._workers.values() if w.state == "ready" and not w.killed
                     and w.group == group and not w.dedicated]
            if exclusive:
                ready = [w for w in ready if not w.pinned]
                live = [w for w in self._workers.values() if w.state != "dead"]
                coming = any(w.state == "starting" and w.group == group for w in live)
                if len(live) < self.max_workers and not coming and not [
                        w for w in ready if w.queued == 0 and w.reserved == 0]:
                    return await self._spawn(group)
            if ready:
                idle = [w for w in ready if w.queued == 0 and w.reserved == 0]
                if idle:
                    return max(idle, key=lambda w: w.last_used)  # as in ``_idle``
                # All busy: wait for the first to free up rather than queue behind one that may
                # be stuck in a long call.
                await self._pool_change()
                continue
            starting = [w for w in self._workers.values() if w.state == "starting"
                        and w.group == group and w.ready is not None]
            if starting:
                with contextlib.suppress(Exception):
                    await asyncio.shield(starting[0].ready)  # type: ignore[arg-type]
                continue
            live = [w for w in self._workers.values() if w.state != "dead"]
            if len(live) >= self.max_workers and any(
                    w.state == "ready" and w.group == group for w in live):
                # The group's workers are all owned by streaming sessions (or, for an exclusive
                # pick, host other instances): wait for one rather than exceed the limit.
                await self._pool_change()
                continue
            if len(live) >= self.max_workers:
                idle = [w for w in live if w.state == "ready" and w.group != group
                        and not w.pinned and not w.lock.locked() and w.reserved == 0]
                if idle:
                    self._retire(min(idle, key=lambda w: w.last_used),
                                 f"making room for a worker of group {group}", replace=False)
            return await self._spawn(group)

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

    async def _pool_change(self) -> None:
        """Wait (first come, first served) until a worker becomes idle, ready or dead."""
        assert self._loop is not None
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._notify()  # pass on the wake-up this cancelled waiter consumed
            raise
        finally:
            if not waiter.done():
                waiter.cancel()

    def _notify(self, everyone: bool = False) -> None:
        """Wake the longest waiter (a worker became idle: one can use it), or all of them."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not everyone:
                    return

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

    async def _request(self, worker: _Worker, request: tuple[Any, ...], spec: NodeSpec | None,
                       during: str, iid: int, deadline: float,
                       on_abandoned: Callable[[tuple[Any, ...]], None] | None = None,
                       ) -> tuple[Any, ...]:
        """Send one request to ``worker`` and await its reply (calls are serialized).

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
        sent = self._send(worker, request, spec, during, iid, deadline, on_abandoned)
        if isinstance(sent, tuple):
            return sent
        return await self._reply(worker, sent, on_abandoned)

    def _send(self, worker: _Worker, request: tuple[Any, ...], spec: NodeSpec | None,
              during: str, iid: int, deadline: float,
              on_abandoned: Callable[[tuple[Any, ...]], None] | None) -> _Call | tuple[Any, ...]:
        """(The caller counted itself in ``queued`` and holds the worker's turn.) Send
        ``request``: the call in flight, or the reply itself when there was nothing to send."""
        loop = self._loop
        assert loop is not None
        call = _Call(loop.create_future(), spec if spec is not None else _NO_SPEC, during, iid,
                     deadline, on_abandoned=on_abandoned)
        if not worker.alive or worker.sock is None or worker.killed:
            self._finish(worker, call)
            raise _WorkerGone(worker.cause or worker.kill_reason or "worker gone")
        op = request[0]
        if op == "run" or op == "call" or op == "release":
            # Piggyback the cleanups released since the last request (the last field, None
            # when there are none).
            if worker.releases:
                releases, worker.releases = worker.releases, []
                request = (*request[:-1], releases)
            elif op == "release":
                self._finish(worker, call)
                return ("ok", None, worker.cpu_used)
        try:
            message, fresh = _shm.pack(request, worker.outbox)
        except BaseException:
            self._finish(worker, call)
            raise
        worker.inflight = call
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
        worker.queued -= 1
        if self._loop is not None:
            worker.last_used = self._loop.time()
        worker.calls += 1
        if self.max_calls and worker.calls >= self.max_calls:
            self._recycle(worker, f"served {worker.calls} calls")
        worker.lock.release()
        if worker.queued == 0 and not self._dispatch(worker):
            self._notify()

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

    def _on_deadline(self, worker: _Worker, call: _Call) -> None:
        if worker.inflight is not call:
            return
        if call.abandoned:
            worker.kill(f"did not stop within {self.cancel_grace_s:g} s of being cancelled")
        else:
            call.deadline_hit = True
            worker.kill("deadline exceeded")

    def _abandon(self, worker: _Worker, call: _Call) -> None:
        """The caller went away: ask the worker to stop, kill it if it does not in time."""
        call.abandoned = True
        worker.signal(signal.SIGUSR1)
        assert self._loop is not None
        if call.timer is not None:
            call.timer.cancel()
        when = min(call.deadline, self._now() + self.cancel_grace_s)
        call.timer = self._loop.call_at(when, self._on_deadline, worker, call)

    def _check_reply(self, worker: _Worker, reply: tuple[Any, ...], spec: NodeSpec,
                     during: str) -> Any:
        status = reply[0]
        if status == "ok" and len(reply) == 3:
            if worker.cpu_used > self.cpu_seconds_lifetime - self.cpu_seconds * 2:
                self._retire(worker, "close to its lifetime CPU limit")
            return reply[1]
        if status != "error" or len(reply) != 6 or reply[5] not in ("initialize", "process"):
            self._misbehaved(worker, f"unexpected reply {status!r}")
            raise WorkerFailure(spec.node_id, "worker broke the control protocol", during=during,
                                kind="protocol")
        _, kind, exc_type, message, _, during = reply
        # Whatever the worker says goes into statuses and logs: keep it bounded.
        exc_type, message = str(exc_type)[:200], str(message)[:4000]
        if kind == "node":
            raise NodeFailed(spec.node_id, exc_type, message)
        if kind == "memory":
            self._retire(worker, "MemoryError")
            raise WorkerFailure(
                spec.node_id, f"memory limit {worker.cap_mb} MiB exceeded ({exc_type}: {message})",
                during=during, kind="memory")
        if kind == "permission":
            raise WorkerFailure(spec.node_id, f"blocked by the sandbox: {exc_type}: {message}",
                                during=during, kind="permission")
        if kind == "limit":
            raise WorkerFailure(spec.node_id, f"a sandbox limit was hit: {exc_type}: {message}",
                                during=during, kind="limit")
        if kind == "import":
            raise WorkerFailure(spec.node_id, f"{exc_type}: {message}", during="initialize",
                                kind="import")
        if kind == "gone":
            raise _WorkerGone(message)
        self._misbehaved(worker, f"unknown error kind {kind!r}")
        raise WorkerFailure(spec.node_id, "worker broke the control protocol", during=during,
                            kind="protocol")

    # --- catalogues of untrusted modules ------------------------------------------------------

    async def describe_module(self, module: str) -> list[NodeDescription]:
        """The node classes of the untrusted ``module``, described by a worker of its own trust
        domain: the module is imported there, never in the server (see ``nodes._catalogue``).
        ModuleUnavailable when it cannot be imported or described; its domain's workers are
        then retired, as no node of it can ever run."""
        self._check_open()
        self._require_layers(module, f"module {module}")
        # While the import runs the domain is not kept at strength: a worker the import kills
        # is not replaced (the replacement would only idle if the module turns out broken).
        kept = module in self.domains
        self.domains = tuple(d for d in self.domains if d != module)
        try:
            catalogue = parse_catalogue(module, await self._describe(module))
        except (ModuleUnavailable, CatalogueInvalid) as exc:
            self._retire_domain(module)
            if isinstance(exc, ModuleUnavailable):
                raise
            raise ModuleUnavailable(module, str(exc)) from None
        if kept:
            self.domains = (*self.domains, module)
            self._replace((self.memory_mb_default, module))
        return catalogue

    async def _describe(self, module: str) -> Any:
        """The raw ``describe`` reply for ``module``, within ``init_timeout_s`` (an import)."""
        group: _Group = (self.memory_mb_default, module)
        deadline = self._now() + self.init_timeout_s
        for _ in range(_ATTEMPTS):
            try:
                worker = await self._pick(group)
            except ServiceUnavailable:
                raise
            except Exception as exc:
                raise ModuleUnavailable(module, f"no sandbox worker available: {exc}") from exc
            try:
                reply = await self._request(worker, ("describe", module), None, "initialize", 0,
                                            deadline)
            except _WorkerGone:
                continue  # died under another request before ours was sent
            except DeadlineExceeded:
                raise ModuleUnavailable(
                    module, f"its import did not finish within {self.init_timeout_s:g} s; "
                            "the worker was killed") from None
            except SandboxFailure as exc:
                raise ModuleUnavailable(module, f"its worker failed: {exc.cause}") from None
            return self._describe_reply(worker, module, reply)
        raise ModuleUnavailable(module, "sandbox workers kept dying before it could be described")

    def _describe_reply(self, worker: _Worker, module: str, reply: tuple[Any, ...]) -> Any:
        status = reply[0]
        if status == "ok" and len(reply) == 3:
            return reply[1]
        if status == "error" and len(reply) == 6:
            _, kind, exc_type, message, _, _ = reply
            if kind == "memory":
                self._retire(worker, "MemoryError")
            # Whatever the worker says goes into logs: keep it bounded.
            raise ModuleUnavailable(module, f"{str(exc_type)[:200]}: {str(message)[:4000]}")
        self._misbehaved(worker, f"unexpected reply {status!r} to describe")
        raise ModuleUnavailable(module, "its worker broke the control protocol")

    def _retire_domain(self, module: str) -> None:
        """No node of ``module`` can run: end its domain's workers (none is starting: nothing
        replaces them while the module is described)."""
        for worker in list(self._workers.values()):
            if worker.domain == module:
                self._retire(worker, f"untrusted module {module} could not be loaded",
                             replace=False)

    # --- the Runtime interface ----------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._started:
            raise RuntimeError("SandboxRuntime.start() was not awaited")
        if self._closed:
            raise ServiceUnavailable("the sandbox runtime is shut down")

    async def call(self, spec: NodeSpec, scope: ExecutionScope,
                   inputs: Mapping[str, Any]) -> Any:
        self._check_open()
        plan = self._class_plan(spec.entry)
        self._require_layers(plan.group[1], f"node '{spec.node_id}' ({spec.node_type})")
        if plan.oneshot:
            while True:
                worker = self._idle(plan.group)
                if worker is None:
                    if not self._serving(plan):
                        break
                    # All busy (the usual case under load): wait for one to free up, as
                    # ``_pick`` would, but without the general path's instance bookkeeping;
                    # usually the reply that frees it sends this call's request at once.
                    try:
                        started = await self._wait_for_run(plan, spec, scope, inputs)
                        if started is None:
                            self._check_open()
                            continue
                        if spec.timeout_s is None:
                            return await self._run_dispatched(started, spec)
                        return await within_node_timeout(spec,
                                                         self._run_dispatched(started, spec))
                    except _WorkerGone:
                        break
                if plan.module not in worker.modules:
                    break
                try:
                    if spec.timeout_s is None:
                        return await self._run_once(worker, spec, scope, inputs)
                    return await within_node_timeout(
                        spec, self._run_once(worker, spec, scope, inputs))
                except _WorkerGone:
                    break  # the worker died first, or forgot the class id: the general path
            return await super().call(spec, scope, inputs)
        instance = self._place(spec, scope)
        if instance is None:
            return await super().call(spec, scope, inputs)
        # What Runtime.call does, minus the coroutines of acquire and release (neither awaits
        # anything for a placed plain node).
        try:
            if spec.timeout_s is None:
                return await self._process(instance, inputs)
            return await within_node_timeout(spec, self._process(instance, inputs))
        finally:
            self._release_now(instance)

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

    async def _wait_for_run(self, plan: _ClassPlan, spec: NodeSpec, scope: ExecutionScope,
                            inputs: Mapping[str, Any]) -> _Started | None:
        """Wait for an idle worker like ``_pool_change`` (first come, first served with the
        other waiters). The reply callback that frees a worker sends this call's request at
        once when it is first in line (``_dispatch``): then the call in flight is returned;
        None means "look again"."""
        assert self._loop is not None
        waiter: asyncio.Future[Any] = self._loop.create_future()
        self._waiters.append(waiter)
        self._runs[waiter] = (plan, spec, scope, inputs)
        try:
            started: _Started | None = await waiter
            return started
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                if waiter.result() is None:
                    self._notify()  # pass on the wake-up this cancelled waiter consumed
                else:
                    worker, call = waiter.result()[:2]
                    if not call.finished:
                        self._abandon(worker, call)
            raise
        finally:
            self._runs.pop(waiter, None)
            if not waiter.done():
                waiter.cancel()

    def _dispatch(self, worker: _Worker) -> bool:
        """``worker`` just became idle: when the longest waiter is a one-shot call it can
        serve, send that call's request now, from the callback that freed the worker (no loop
        iteration for the waiter to wake up in, and the worker gets its next request before it
        goes back to sleep), and hand the waiter the call in flight. False: nothing sent."""
        waiters = self._waiters
        while waiters and waiters[0].done():
            waiters.popleft()
        if not waiters:
            return False
        waiter = waiters[0]
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
        waiters.popleft()
        del self._runs[waiter]
        worker.queued += 1
        request, key, kid, define = self._run_request(worker, spec, scope, inputs)
        try:
            sent = self._send(worker, request, spec, "process", 0,
                              self._deadline(spec, scope, None), None)
        except Exception as exc:  # _WorkerGone, or inputs that cannot be sent: the caller's
            waiter.set_exception(exc)
            return True
        assert not isinstance(sent, tuple)
        waiter.set_result((worker, sent, key, kid, define))
        return True

    async def _run_dispatched(self, started: _Started, spec: NodeSpec) -> Any:
        worker, call, key, kid, define = started
        reply = await self._reply(worker, call, None)
        return self._run_reply(worker, spec, reply, key, kid, define)

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
        the first request names them with a new id (``kinds``), later ones send the id only. A
        worker that does not know an id (replaced workers start empty; a worker drops ids past
        its bound) answers ``gone``: the id is forgotten and ``_WorkerGone`` sends the caller
        down the general path, which creates the instance from scratch."""
        request, key, kid, define = self._run_request(worker, spec, scope, inputs)
        reply = await self._request(worker, request, spec, "process", 0,
                                    self._deadline(spec, scope, None))
        return self._run_reply(worker, spec, reply, key, kid, define)

    def _run_request(self, worker: _Worker, spec: NodeSpec, scope: ExecutionScope,
                     inputs: Mapping[str, Any]) -> tuple[tuple[Any, ...], _KindKey, int,
                                                         tuple[str, str, str] | None]:
        """The ``run`` request for ``worker``: with the class id it knows, else a new one and
        the class's definition."""
        key = (spec.entry.class_ref, spec.params_key)
        kid = worker.kinds.get(key)
        define: tuple[str, str, str] | None = None
        if kid is None:
            kid = next(self._kids)
            define = (*spec.entry.class_ref, spec.params_key)
        request = ("run", kid, inputs if type(inputs) is dict else dict(inputs), spec.node_id,
                   scope.execution_id, define, None)
        return request, key, kid, define

    def _run_reply(self, worker: _Worker, spec: NodeSpec, reply: tuple[Any, ...],
                   key: _KindKey, kid: int, define: tuple[str, str, str] | None) -> Any:
        if reply[0] == "error" and reply[1] == "gone":
            worker.kinds.pop(key, None)
        elif define is not None and (reply[0] == "ok" or reply[-1] == "process"):
            # The worker created the instance, so it holds the id.
            if len(worker.kinds) >= MAX_KINDS:  # the worker keeps as many
                worker.kinds.clear()
            worker.kinds[key] = kid
        return self._check_reply(worker, reply, spec, "process")

    async def acquire(self, spec: NodeSpec, scope: ExecutionScope) -> SandboxInstance:
        self._check_open()
        self._require_layers(self._group_of(spec)[1], f"node '{spec.node_id}' ({spec.node_type})")
        placed = self._place(spec, scope)
        if placed is not None:
            return placed
        if spec.entry.reusable:
            worker, iid = await self._acquire_warm(spec, scope)
            initialized = True
        else:
            worker, iid, initialized = await self._create(spec, scope, self._exclusive(spec))
        instance = SandboxInstance(spec, scope, self, worker, iid)
        instance.initialized = initialized
        instance.reserved = not initialized
        self._dedicate(instance)
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
        return ("init", iid, module, qualname, spec.params_key, spec.node_id,
                scope.execution_id)

    async def _init_on(self, worker: _Worker, spec: NodeSpec, scope: ExecutionScope, iid: int,
                       on_abandoned: Callable[[tuple[Any, ...]], None] | None = None) -> None:
        """Initialize on ``worker``; ``_WorkerGone`` if it died before taking the request (the
        caller picks another)."""
        deadline = self._deadline(spec, scope, self.init_timeout_s)
        reply = await self._request(worker, self._init_request(spec, scope, iid), spec,
                                    "initialize", iid, deadline, on_abandoned)
        self._check_reply(worker, reply, spec, "initialize")

    async def _pick_for(self, spec: NodeSpec, exclusive: bool = False) -> _Worker:
        try:
            return await self._pick(self._group_of(spec), exclusive)
        except (asyncio.CancelledError, ServiceUnavailable):
            raise
        except Exception as exc:
            raise WorkerFailure(spec.node_id, f"no sandbox worker available: {exc}",
                                during="initialize", kind="unavailable") from exc

    async def _create(self, spec: NodeSpec, scope: ExecutionScope,
                      exclusive: bool = False) -> tuple[_Worker, int, bool]:
        """Place a fresh instance on a worker: ``(worker, iid, initialized)``.

        A node whose class has no ``initialize`` and whose module the worker has imported
        before is created lazily by its first call (one round trip instead of two); otherwise
        it is initialized now, so that a crash while importing or initializing is reported as
        such (``during="initialize"``, which the fallback rule cares about).
        """
        for _ in range(_ATTEMPTS):
            worker = await self._pick_for(spec, exclusive)
            iid = next(self._iids)
            worker.pinned.add(iid)
            if exclusive:
                # At once, before any await: nobody else may be placed here meanwhile.
                worker.exclusive.add(iid)
            if not spec.entry.has_initialize and spec.entry.class_module in worker.modules:
                worker.reserved += 1
                return worker, iid, False

            def abandoned(reply: tuple[Any, ...], worker: _Worker = worker,
                          iid: int = iid) -> None:
                # Initialized after its caller left: release it.
                worker.pinned.discard(iid)
                if reply[0] == "ok":
                    self._release_on(worker, spec, iid)

            try:
                await self._init_on(worker, spec, scope, iid, abandoned)
            except _WorkerGone:
                worker.pinned.discard(iid)
                continue  # died under another call before ours was sent: try another
            except asyncio.CancelledError:
                raise
            except BaseException:
                worker.pinned.discard(iid)
                raise
            worker.modules.add(spec.entry.class_module)
            return worker, iid, True
        raise WorkerFailure(spec.node_id, "sandbox workers kept dying before it could start",
                            during="initialize", kind="crash")

    async def _acquire_warm(self, spec: NodeSpec, scope: ExecutionScope) -> tuple[_Worker, int]:
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
                worker = await self._pick_for(spec)
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
                    worker, ("call", instance.iid,
                             inputs if type(inputs) is dict else dict(inputs), init, None),
                    spec, "process", instance.iid, deadline)
            except _WorkerGone:
                continue
            if init is not None and (reply[0] == "ok" or reply[-1] == "process"):
                instance.initialized = True
            try:
                return self._check_reply(worker, reply, spec, "process")
            except _WorkerGone:
                instance.initialized = False
                continue
        raise WorkerFailure(spec.node_id, "sandbox workers kept dying before it could run",
                            during="process", kind="crash")

    # --- streaming sessions -------------------------------------------------------------------

    def _on_stream_message(self, worker: _Worker, call: _Call, message: tuple[Any, ...]) -> None:
        """A step of a stream ended (the generator pulls, or yielded): hand it to the session,
        or, once the session left, answer with a cancel."""
        if (message[0] == "need" and len(message) != 2) or (
                message[0] == "out" and (len(message) != 4 or not (
                    message[2] is None or type(message[2]) is int))):
            self._misbehaved(worker, f"malformed {message[0]!r} message")
            return
        with contextlib.suppress(TypeError, ValueError):
            worker.cpu_used = float(message[-1])
        if call.abandoned:
            self._send_stream(worker, call, ("cancel",))
            return
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        if not call.future.done():
            call.future.set_result(message)

    def _send_stream(self, worker: _Worker, call: _Call, message: tuple[Any, ...]) -> bool:
        """Send the session's next message to the worker; False when the worker is gone."""
        if call.finished or worker.sock is None:
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
        our_turn = False  # True while the worker waits for our next message

        async def exchange(message: tuple[Any, ...]) -> tuple[Any, ...]:
            nonlocal our_turn
            if call.finished:
                raise self._death_error(call, worker.cause or "sandbox worker gone")
            call.future = loop.create_future()
            call.deadline = self._deadline(spec, instance.scope, None)
            our_turn = False
            if not self._send_stream(worker, call, message):
                raise self._death_error(call, worker.cause or "control channel failed")
            call.timer = loop.call_at(call.deadline, self._on_deadline, worker, call)
            reply = await call.future
            our_turn = call.streaming and not call.finished
            return reply

        try:
            reply = await exchange(("stream", instance.iid, init, releases))
            if init is not None and (reply[0] != "error" or reply[-1] == "process"):
                instance.initialized = True
            while True:
                if reply[0] == "need":
                    try:
                        chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        reply = await exchange(("end",))
                        continue
                    reply = await exchange(("chunk", chunk.sequence, dict(chunk.inputs)))
                elif reply[0] == "out":
                    _, value, sequence, _ = reply
                    yield value if sequence is None else Emit(value, sequence)
                    reply = await exchange(("next",))
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
                    if self._send_stream(worker, call, ("cancel",)):
                        # From now: the step deadline did not run while the worker waited.
                        call.timer = loop.call_at(self._now() + self.cancel_grace_s,
                                                  self._on_deadline, worker, call)
                    else:
                        worker.kill("control channel failed")
                else:
                    if not call.future.done():
                        call.future.cancel()
                    self._abandon(worker, call)

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
            instance.worker, instance.iid = await self._acquire_warm(spec, instance.scope)
            instance.initialized = True
        else:
            instance.worker, instance.iid, instance.initialized = await self._create(
                spec, instance.scope, self._exclusive(spec))
            instance.reserved = not instance.initialized
            self._dedicate(instance)

    async def release(self, instance: NodeInstance) -> None:
        """Warm instances stay; a fresh one's cleanup runs in its worker before the worker's
        next request (or at once if the worker stays idle), without holding the caller."""
        assert isinstance(instance, SandboxInstance)
        self._release_now(instance)

    def _release_now(self, instance: SandboxInstance) -> None:
        if instance.released:
            return
        instance.released = True
        if instance.reserved or instance.dedicated:
            instance.unreserve()
            instance.dedicated = False
            if instance.worker.queued == 0 and instance.worker.reserved == 0:
                self._notify()
        if instance.spec.entry.reusable:
            return
        instance.worker.pinned.discard(instance.iid)
        if instance.initialized and instance.worker.alive:
            self._release_on(instance.worker, instance.spec, instance.iid)
        if self._waiters and not instance.worker.pinned:
            # A worker no instance is pinned to any more may serve an exclusive pick.
            self._notify(everyone=True)

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
                await self._request(worker, ("release", None), spec, "cleanup", 0,
                                    self._now() + self.call_timeout_s)
        except _WorkerGone:
            pass  # died with the worker: nothing left to clean up
        except Exception as exc:
            log.warning("releasing sandboxed instances failed: %s", exc)


class _NoSpec:
    node_id = "<runtime>"
    node_type = "<runtime>"


_NO_SPEC: Any = _NoSpec()
