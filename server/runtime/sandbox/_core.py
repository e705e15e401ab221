"""The sandbox runtime's settings and state, shared by its parts, and the seams between them.

``SandboxRuntime`` is one object assembled from one class per concern, each built on the one
before it: ``_Core`` (this module) <- ``_Pool`` (``_pool``: workers, their lives and deaths,
choosing one) <- ``_Calls`` (``_calls``: a request and its reply, deadlines, one-shot ``run``
requests) <- ``_Instances`` (``_instances``: node instances placed in workers, warm instances,
releases) <- ``_Streaming`` (``_streaming``: stream sessions) <- ``SandboxRuntime``
(``_runtime``: the public surface). A part calls what lies before it directly; the few calls
that go the other way (the pool failing the call a dead worker had in flight, the reply
callback handing a stream step to its session) are declared below and defined by the part
that owns them. Mixins rather than composition keep the per-request path as it was: one
object, plain attribute and method lookups, no delegation hop.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tensorline.server._errors import ServiceUnavailable
from tensorline.server.manifest import NodeSpec
from tensorline.server.runtime._base import ExecutionScope, LayerStatus, Runtime
from tensorline.server.runtime.sandbox import _shm
from tensorline.server.runtime.sandbox._launcher import Launcher
from tensorline.server.runtime.sandbox._placement import CpuPlacement
from tensorline.server.runtime.sandbox._records import (
    MIN_MEMORY_MB,
    _Call,
    _ClassPlan,
    _Group,
    _Waiters,
    _Worker,
)
from tensorline.server.runtime.sandbox._uids import WORKER_UID_BASE, WORKER_UID_COUNT, UidLeases

if TYPE_CHECKING:
    from tensorline.server.runtime.sandbox._instances import SandboxInstance


class _Core(Runtime):
    """Settings (the constructor's arguments) and the state every part of the runtime shares."""

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
        model_paths: Sequence[str] = (),
        environment: Sequence[str] = (),
        separate_uids: bool = True,
        max_calls: int = 0,
        recycle_rss_mb: int | None = None,
        probe_interval_s: float = 30.0,
        idle_s: float = 60.0,
        required_layers: Sequence[str] = (),
        preload_modules: Sequence[str] = (),
        co_locate: bool = True,
        batch_wait_s: float = 0.0,
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
        # Per trust domain: each domain's pool grows on demand to this many shared workers
        # (and as many more dedicated to streaming sessions, see ``_pick``), and shrinks back to
        # its baseline once workers have been idle ``idle_s``.
        self.max_workers = max(max_workers if max_workers is not None else workers + 2,
                               workers, self.workers_per_domain)
        self.idle_s = idle_s
        self.cpu_seconds = cpu_seconds
        self.cpu_seconds_lifetime = max(cpu_seconds_lifetime, cpu_seconds * 2)
        self.nofile = nofile
        # Per file in the scratch dir (reply segments are memfds the server makes).
        self.fsize_mb = fsize_mb
        self.threads = threads
        self.scratch_mb = scratch_mb
        # Operator-named paths workers may read, and server environment variables they get.
        self.extra_read_paths = tuple(read_paths)
        # The model roots (``Settings.model_roots``): readable, not executable, and unlike
        # ``read_paths`` never a reason for a worker to keep the server's uid (see
        # ``_bootstrap``). Real paths: Landlock and the mount bridging act on the real tree.
        self.model_paths = tuple(dict.fromkeys(os.path.realpath(p) for p in model_paths))
        self.environment = tuple(environment)
        # Trusted modules the launcher imports before forking workers (``_zygote``).
        self.preload_modules = tuple(preload_modules)
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
        self._shrinker: asyncio.Task[None] | None = None
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
        # Workers with a call in flight (``_Call`` set as their ``inflight``), and where the
        # worker of a short call runs while they do not overlap (see ``_placement``).
        self._busy = 0
        self._placement = CpuPlacement(co_locate)
        # Loop time a call was last sent while another was in flight: the sandbox is loaded,
        # and a short one-shot call waits up to ``batch_wait_s`` to share a round trip (see
        # ``_gather``; 0, the default, turns that off).
        self._overlapped_at = float("-inf")
        self.batch_wait_s = max(0.0, batch_wait_s)
        # Calls waiting to share a round trip, by what they share (``_gather._Gathered``),
        # and how many calls have waited so.
        self._gathering: dict[tuple[Any, ...], Any] = {}
        self._gathered_calls = 0
        self._wids = itertools.count(1)
        self._uid_leases = UidLeases(WORKER_UID_BASE, WORKER_UID_COUNT)
        self._iids = itertools.count(1)
        self._class_ids = itertools.count(1)
        # By NodeEntry.class_ref: untrusted nodes have no class object in the server.
        self._class_plans: dict[tuple[str, str], _ClassPlan] = {}
        self._background: set[asyncio.Future[Any]] = set()
        self._layers: list[LayerStatus] = []
        # Set once ``start`` has logged the layers of its workers (one summary): from then on
        # ``_record_layers`` logs changes only.
        self._layers_reported = False
        self._launcher: Launcher | None = None
        self._by_pid: dict[int, _Worker] = {}
        # Workers asked for whose start has not registered them yet (see ``_spawn``).
        self._pending: dict[_Group, int] = {}
        # Per trust domain: workers being started for streaming sessions (see
        # ``_Pool._dedicated_worker``), counted against the dedicated budget.
        self._dedicating: dict[str, int] = {}
        self._started = False
        self._closed = False
        self._spawn_failures = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        # Waiters for a worker of a group to become idle (``_pool_change``, ``_wait_for_run``),
        # one line per group (a worker freed in one group is no use to a waiter of another),
        # served round robin by caller; those of one-shot calls are in ``_runs`` with what
        # ``_dispatch`` needs to send their request.
        self._waiters: dict[_Group, _Waiters] = {}
        # (A list of input sets is a ``runs`` batch.)
        self._runs: dict[asyncio.Future[Any], tuple[_ClassPlan, NodeSpec, ExecutionScope,
                                                    Mapping[str, Any] | list[Mapping[str, Any]]]
                         ] = {}
        self._restarts = 0
        # Batches sent (``runs`` and ``calls`` requests), and the input sets they carried.
        self._batches = 0
        self._batched_inputs = 0

    # --- shared helpers -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._started:
            raise RuntimeError("SandboxRuntime.start() was not awaited")
        if self._closed:
            raise ServiceUnavailable("the sandbox runtime is shut down")

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _line(self, group: _Group) -> _Waiters:
        line = self._waiters.get(group)
        if line is None:
            line = self._waiters[group] = _Waiters()
        return line

    def _track(self, future: asyncio.Future[Any]) -> asyncio.Future[Any]:
        self._background.add(future)

        def done(f: asyncio.Future[Any]) -> None:
            self._background.discard(f)
            if not f.cancelled():
                f.exception()

        future.add_done_callback(done)
        return future

    # --- seams: declared here, defined by the part named -------------------------------------

    async def _request(self, worker: _Worker, request: tuple[Any, ...], spec: NodeSpec | None,
                       during: str, iid: int, deadline: float,
                       on_abandoned: Callable[[tuple[Any, ...]], None] | None = None,
                       ) -> tuple[Any, ...]:
        """(``_calls``) Send one request to ``worker`` and await its reply."""
        raise NotImplementedError

    def _finish(self, worker: _Worker, call: _Call) -> None:
        """(``_calls``) The worker is done with ``call``: free it for the next one."""
        raise NotImplementedError

    def _death_error(self, call: _Call, cause: str) -> Exception:
        """(``_calls``) What the call in flight on a worker that died raises."""
        raise NotImplementedError

    def _on_readable(self, worker: _Worker) -> None:
        """(``_calls``) The reader callback of a worker's control socket."""
        raise NotImplementedError

    def _on_stream_message(self, worker: _Worker, call: _Call, message: tuple[Any, ...]) -> None:
        """(``_streaming``) A step of a stream session ended in the worker."""
        raise NotImplementedError

    def _stream(self, instance: SandboxInstance,
                chunks: AsyncIterator[Any]) -> AsyncGenerator[Any, None]:
        """(``_streaming``) Run a streaming node's generator in its worker."""
        raise NotImplementedError
