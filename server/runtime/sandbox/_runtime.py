"""``SandboxRuntime``: nodes run in a supervised pool of isolated worker processes.

This module is the runtime's public surface: its lifecycle (``start``, ``shutdown``, health,
layers, stats), the ``Runtime`` interface (``call``, ``acquire``, ``release``; ``stream`` is
``SandboxInstance.stream``) and the catalogues of untrusted modules (``describe_module``).
The work is done by the parts it is assembled from (see ``_core``); the design and the measured
facts behind it are in docs/architecture.md ("Sandbox runtime design").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from tensorline.server._errors import (
    DeadlineExceeded,
    LayerMissing,
    SandboxFailure,
    ServiceUnavailable,
)
from tensorline.server.manifest import NodeSpec
from tensorline.server.nodes import CatalogueInvalid, NodeDescription, parse_catalogue
from tensorline.server.runtime._base import (
    BatchOutcome,
    ExecutionScope,
    LayerStatus,
    NodeInstance,
    within_node_timeout,
)
from tensorline.server.runtime.sandbox import _paths
from tensorline.server.runtime.sandbox._failures import ModuleUnavailable, _WorkerGone
from tensorline.server.runtime.sandbox._gather import _Gathering
from tensorline.server.runtime.sandbox._instances import OneShotInstance, SandboxInstance
from tensorline.server.runtime.sandbox._launcher import Launcher, minimal_environment
from tensorline.server.runtime.sandbox._messages import (
    EXIT_REQUEST,
    MEMORY,
    describe_request,
    error_fields,
    is_error,
    is_ok,
)
from tensorline.server.runtime.sandbox._records import _ATTEMPTS, _ClassPlan, _Group, _Worker

log = logging.getLogger(__name__)


class SandboxRuntime(_Gathering):
    """Nodes run in isolated worker processes; see docs/architecture.md ("Sandbox runtime
    design")."""

    name: ClassVar[str] = "sandbox"

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
        _remove_stale_scratch(os.path.dirname(self._scratch_root))
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
                                  self.start_timeout_s, preload=self.preload_modules)
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
        self._log_layers()
        if self.probe_interval_s > 0:
            self._prober = asyncio.ensure_future(self._probe_idle_workers())
        if self.idle_s > 0:
            self._shrinker = asyncio.ensure_future(self._shrink_idle_workers())
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

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_gathered()
        # The server's threads bound with a worker run on all its CPUs again.
        self._placement.release_all()
        self._placement.enabled = False
        for task in (self._prober, self._shrinker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
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
                    await self._request(worker, EXIT_REQUEST, None, "cleanup", 0,
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
                "workers": float(sum(1 for w in self._workers.values() if w.alive)),
                "batches": float(self._batches), "batched_inputs": float(self._batched_inputs),
                "gathered_calls": float(self._gathered_calls)}

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
                worker = await self._pick(group, spec=None, deadline=deadline)
            except ServiceUnavailable:
                raise
            except Exception as exc:
                raise ModuleUnavailable(module, f"no sandbox worker available: {exc}") from exc
            try:
                reply = await self._request(worker, describe_request(module), None, "initialize", 0,
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
        if is_ok(reply):
            _, catalogue, _ = reply
            return catalogue
        if is_error(reply):
            kind, exc_type, message, _ = error_fields(reply)
            if kind == MEMORY:
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

    async def call(self, spec: NodeSpec, scope: ExecutionScope,
                   inputs: Mapping[str, Any]) -> Any:
        self._check_open()
        plan = self._class_plan(spec.entry)
        self._require_layers(plan.group[1], f"node '{spec.node_id}' ({spec.node_type})")
        if plan.oneshot and self._gathers(spec):
            return await self._gathered_call(plan, spec, scope, inputs)
        return await self._call_now(spec, scope, inputs, plan)

    async def _call_now(self, spec: NodeSpec, scope: ExecutionScope,
                        inputs: Mapping[str, Any], plan: _ClassPlan) -> Any:
        """``call`` (its checks done, ``plan`` its node's) without waiting to share a round
        trip (``_gather``)."""
        if plan.oneshot:
            again = False
            while True:
                worker = self._idle(plan.group)
                if worker is None:
                    if not self._serving(plan):
                        break
                    # All busy (the usual case under load): grow the pool if the domain has
                    # room, and wait for a worker as ``_pick`` would, but without the general
                    # path's instance bookkeeping; usually the reply that frees one sends this
                    # call's request at once.
                    self._grow(plan.group)
                    try:
                        started = await self._wait_for_run(plan, spec, scope, inputs, again)
                        if started is None:
                            self._check_open()
                            again = True
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
            return await self._call_general(spec, scope, inputs)
        instance = self._place(spec, scope)
        if instance is None:
            return await self._call_general(spec, scope, inputs)
        # What Runtime.call does, minus the coroutines of acquire and release (neither awaits
        # anything for a placed plain node).
        try:
            if spec.timeout_s is None:
                return await self._process(instance, inputs)
            return await within_node_timeout(spec, self._process(instance, inputs))
        finally:
            self._release_now(instance)

    async def call_batch(self, spec: NodeSpec, scope: ExecutionScope,
                         batch: Sequence[Mapping[str, Any]]) -> BatchOutcome:
        """``call`` on each input set of ``batch`` in order, up to the first failure. A
        one-shot node runs several input sets per round trip: one ``runs`` request, whose
        replies report the values of what ran (see ``_messages``), each input set with the
        deadline a call would have; what one turn of the worker did not run
        (``BATCH_TURN_S``) waits for the next, in line with other callers. Not for a node with
        a timeout of its own, whose expiry a stream session reports per input set. A batch no
        worker took (it did not know the class, or it is being replaced) goes on as single
        calls, which deal with that."""
        plan = self._class_plan(spec.entry)
        values: list[Any] = []
        try:
            if plan.oneshot and spec.timeout_s is None:
                self._check_open()
                self._require_layers(plan.group[1], f"node '{spec.node_id}' ({spec.node_type})")
                again = False
                while len(values) < len(batch) - 1:  # the last one alone goes through call
                    rest = list(batch[len(values):])
                    worker = self._idle(plan.group)
                    if worker is None:
                        if not self._serving(plan):
                            break
                        self._grow(plan.group)
                        started = await self._wait_for_run(plan, spec, scope, rest, again)
                        if started is None:
                            self._check_open()
                            again = True
                            continue
                        outcome = await self._run_batch_dispatched(started, spec)
                    elif plan.module not in worker.modules:
                        break
                    else:
                        outcome = await self._run_batch_once(worker, spec, scope, rest)
                    values += outcome.values
                    if isinstance(outcome.failure, _WorkerGone):
                        break  # nothing ran (no such class there, or it is being replaced)
                    if outcome.failure is not None:
                        return BatchOutcome(values, outcome.failure, outcome.span)
        except Exception as exc:
            return BatchOutcome(values, exc)
        singles = await super().call_batch(spec, scope, batch[len(values):])
        return BatchOutcome(values + singles.values, singles.failure)

    async def _call_general(self, spec: NodeSpec, scope: ExecutionScope,
                            inputs: Mapping[str, Any]) -> Any:
        """``Runtime.call`` with an instance placed for this one call (it may wait for an idle
        worker: the call is about to run)."""
        instance = self._place(spec, scope) or await self._instance(spec, scope, host=False)
        try:
            return await within_node_timeout(spec, instance.process(inputs))
        finally:
            self._release_now(instance)

    async def acquire(self, spec: NodeSpec, scope: ExecutionScope) -> NodeInstance:
        """An instance for a stream session. A one-shot node gets none (``OneShotInstance``:
        each chunk is a call); others are hosted without waiting for an idle worker (see
        ``_pick``), so a session's nodes never wait for workers its other nodes hold."""
        self._check_open()
        plan = self._class_plan(spec.entry)
        self._require_layers(plan.group[1], f"node '{spec.node_id}' ({spec.node_type})")
        if plan.oneshot and not self._exclusive(spec):  # a streaming node needs its own worker
            return OneShotInstance(spec, scope, self)
        return await self._instance(spec, scope, host=True)

    async def prepare(self, spec: NodeSpec, scope: ExecutionScope) -> None:
        """Warm ``spec`` in a worker as a unary call would find it: a reusable node's instance
        is initialized and stays warm there; any other node is created (its module imported,
        its ``initialize`` run) and released, so a class that cannot load in a worker fails
        here. Nothing is pinned or reserved afterwards."""
        self._check_open()
        plan = self._class_plan(spec.entry)
        self._require_layers(plan.group[1], f"node '{spec.node_id}' ({spec.node_type})")
        if spec.entry.reusable:
            await self._acquire_warm(spec, scope)
            return
        self._release_now(await self._instance(spec, scope, host=False))

    async def _instance(self, spec: NodeSpec, scope: ExecutionScope,
                        host: bool) -> SandboxInstance:
        if spec.entry.reusable:
            worker, iid = await self._acquire_warm(spec, scope, host)
            initialized = True
        else:
            # Only a session (``host``) runs a streaming node's generator and needs its worker
            # to itself; a unary call of one is a plain process call.
            worker, iid, initialized = await self._create(
                spec, scope, host and self._exclusive(spec), host)
        instance = SandboxInstance(spec, scope, self, worker, iid)
        instance.initialized = initialized
        # ``_create`` reserved the worker for a call's instance, initialized or not (a warm
        # instance is shared: its worker is never reserved for one call).
        instance.reserved = not host and not spec.entry.reusable
        if host:
            self._dedicate(instance)
        return instance

    async def release(self, instance: NodeInstance) -> None:
        """Warm instances stay; a fresh one's cleanup runs in its worker before the worker's
        next request (or at once if the worker stays idle), without holding the caller."""
        if isinstance(instance, OneShotInstance):
            return
        assert isinstance(instance, SandboxInstance)
        self._release_now(instance)


def _remove_stale_scratch(root: str) -> None:
    """Remove the scratch roots of servers that died without cleaning up (SIGKILL), and only
    those: a ``tensorline-sandbox-<pid>`` whose pid is no longer alive."""
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            prefix, _, pid = name.rpartition("-")
            if prefix != "tensorline-sandbox" or not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                log.info("removing the scratch dir of a dead server: %s", name)
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            except OSError:
                pass  # alive (another user's): not ours to remove
