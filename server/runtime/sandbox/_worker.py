"""The code a sandbox worker process runs: the launcher (``_zygote``) preloads it and each worker
it forks runs it (``_bootstrap``). It imports nothing gRPC; the server process imports it only
for ``WorkerConfig`` and never runs it.

What a worker does and why (the requests it serves, the one-round-trip ``call`` and
``run``, the stream conversation, how node coroutines are awaited, cancellation by SIGUSR1) is
docs/architecture.md, "The sandbox worker".
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import CoroutineType
from typing import Any

from tensorline.server.nodes import Chunk, Emit, Node, NodeContext
from tensorline.server.runtime.sandbox import _isolation, _shm
from tensorline.server.runtime.sandbox._messages import (
    BATCH_FLUSH_S,
    BATCH_TURN_S,
    CALL,
    CALLS,
    CHUNK,
    DESCRIBE,
    END,
    EXIT,
    GONE,
    IMPORT,
    INIT,
    INITIALIZE,
    LOADED_MESSAGE,
    MAX_CLASS_IDS,
    MEMORY,
    NEXT,
    NODE,
    OK,
    PER_INSTANCE,
    PROBE,
    PROCESS,
    RELEASE,
    RUN,
    RUNS,
    STREAM,
    chunk_fields,
    error,
    event_message,
    need_message,
    ok,
    out_message,
)
from tensorline.server.runtime.sandbox._worker_channel import WorkerChannel, _ServerGone
from tensorline.server.runtime.sandbox._worker_errors import (
    _failure,
    _LoadFailed,
    describe,
)

RUNTIME_NAME = "sandbox"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    worker_id: int
    limits: _isolation.Limits
    scratch_dir: str
    inline_max: int
    namespaces: bool = True
    landlock: bool = True
    seccomp: bool = True
    # Device nodes (existing paths) Landlock lets the worker open read/write, e.g. GPUs.
    devices: tuple[str, ...] = ()
    # What Landlock lets the worker read (hierarchies) and only list (directories).
    read_paths: tuple[str, ...] = ()
    list_paths: tuple[str, ...] = ()
    # Model roots Landlock lets the worker read (not execute), bridged like ``read_paths``.
    model_paths: tuple[str, ...] = ()
    # The worker's own uid (and gid; None: keep the server's).
    uid: int | None = None
    # Peak RSS past which the worker asks to be replaced (0: never).
    recycle_rss_mb: int = 0


class _StreamStopped(BaseException):
    """The server cancelled the stream (a BaseException, so a node's ``except Exception`` does
    not swallow it)."""


@dataclass(slots=True)
class _Hosted:
    node: Node
    context: NodeContext


class _Worker(WorkerChannel):
    def __init__(self, config: WorkerConfig, sock: socket.socket) -> None:
        super().__init__(config, sock)
        self.instances: dict[int, _Hosted] = {}
        self.params: dict[tuple[str, str, str], Any] = {}
        # Class ids the server defined with ``run`` requests: id -> (class, params).
        self.defined: dict[int, tuple[Any, Any]] = {}
        # Node classes by (module, qualname): a repeated import_module + getattr walk costs more
        # than a whole small call.
        self.classes: dict[tuple[str, str], Any] = {}
        self.loop = asyncio.new_event_loop()
        # The task that serves requests (see ``serve``), and whether it is suspended in a node's
        # coroutine (the only place a cancellation may land).
        self.task: asyncio.Task[None] | None = None
        self.awaiting = False
        self.current: _Hosted | None = None
        # Cancellation: the signal handler writes the call generation to this pipe; a thread
        # applies it (see on_cancel_signal).
        self.generation = 0
        self.generation_lock = threading.Lock()
        self.cancel_r, self.cancel_w = os.pipe()
        os.set_blocking(self.cancel_w, False)
        # The generation of the last request the server cancelled: a ``runs`` batch stops
        # before its next input set (the signal may land between two of them).
        self.stopped = -1

    # --- serving ------------------------------------------------------------------------------

    def run(self) -> None:
        self.loop.run_until_complete(self.serve())

    async def serve(self) -> None:
        """Serve requests until the server closes the socket or says ``exit``. Blocking reads
        are fine here: the loop has nothing else to do while the worker waits for a request."""
        self.task = asyncio.current_task()
        budget = self.config.limits.cpu_seconds
        while True:
            request = self._next_message(copy=False)
            if request is None:
                return
            op = request[0]
            if op == EXIT:
                await self._cleanup_all()
                self._reply(ok(None, _isolation.cpu_used()))
                return
            _isolation.set_call_cpu_budget(budget)
            with self.generation_lock:
                # A new request: a cancellation signalled for an earlier one no longer applies,
                # and a warm instance must not see an earlier call's cancellation.
                self.generation += 1
                if op in PER_INSTANCE and request[1] in self.instances:  # [1]: the iid
                    self.instances[request[1]].context.cancelled.clear()
            if op in (RUN, RUNS):
                if self.unhealthy:
                    # Sent before the server read our "unhealthy": it tries another worker.
                    self._reply(_being_replaced())
                    continue
                if op == RUN:
                    self._reply(await self._run_once(request))
                else:
                    await self._run_batch(request, budget)
                continue
            if op == CALLS:
                await self._run_batch(request, budget)
                continue
            try:
                reply = await self._handle(op, request)
            except _ServerGone:
                return
            self._reply(reply)

    async def _handle(self, op: str, request: tuple[Any, ...]) -> tuple[Any, ...]:
        """The reply to one request: ``("ok", value, cpu)`` or ``("error", kind, type,
        message, cpu, during)``; the CPU reading is taken once, last."""
        if op == CALL:
            _, iid, inputs, init, releases = request
            hosted = await self._prepare(iid, init, releases)
            if type(hosted) is tuple:
                return hosted
            assert isinstance(hosted, _Hosted)
            return await self._call(hosted, inputs)
        if op == STREAM:
            _, iid, init, releases = request
            hosted = await self._prepare(iid, init, releases)
            if type(hosted) is tuple:
                return hosted
            assert isinstance(hosted, _Hosted)
            try:
                await self._stream(hosted)
            except _ServerGone:
                raise
            except BaseException as exc:
                return _failure(exc, PROCESS)
            return ok(None, _isolation.cpu_used())
        if op == INIT:
            try:
                _, iid, module, qualname, params_json, node_id, execution_id = request
                await self._init(iid, module, qualname, params_json, node_id, execution_id)
            except BaseException as exc:
                return _failure(exc, INITIALIZE)
            return ok(None, _isolation.cpu_used())
        if op == RELEASE:
            _, iids = request
            await self._release(iids)
            return ok(None, _isolation.cpu_used())
        if op == DESCRIBE:
            _, module = request
            return self._describe(module)
        if op == PROBE:
            # The health check runs before this reply is sent (``_check_health``).
            return ok(None, _isolation.cpu_used())
        return error(NODE, "ValueError", f"unknown op {op!r}", _isolation.cpu_used(), PROCESS)

    async def _call(self, hosted: _Hosted, inputs: Any) -> tuple[Any, ...]:
        """``process`` of a hosted instance: the reply."""
        try:
            value = await self._run(hosted, "process", inputs)
        except BaseException as exc:
            return _failure(exc, PROCESS)
        return (OK, value, _isolation.cpu_used())  # ok(), inline: per request

    def _describe(self, module: str) -> tuple[Any, ...]:
        """``("describe", module)``: import an untrusted module here, where its top-level code
        may run, and reply with its catalogue as plain data (see ``nodes._catalogue``)."""
        # Imported on first use: only workers of untrusted domains are ever asked.
        from tensorline.server.nodes import describe_module

        try:
            catalogue = describe_module(str(module))
        except BaseException as exc:
            # SystemExit or KeyboardInterrupt raised by the module's top level included: the
            # module failed to load, the worker carries on.
            kind = MEMORY if isinstance(exc, MemoryError) else IMPORT
            return error(kind, type(exc).__name__, describe(exc), _isolation.cpu_used(),
                         INITIALIZE)
        return ok(catalogue, _isolation.cpu_used())

    async def _run_once(self, request: tuple[Any, ...]) -> tuple[Any, ...]:
        """``("run", class_id, inputs, node_id, execution_id, define, releases)``: create an
        instance of class id ``class_id`` (defined by ``define``, ``(module, qualname,
        params_json)``, the first time), run its ``process`` and drop it: a node without
        initialize or cleanup needs nothing more, and nothing is kept between requests."""
        _, class_id, inputs, node_id, execution_id, define, releases = request
        if releases:
            await self._release(releases)
        defined, failure = self._defined(class_id, define)
        if failure is not None:
            return failure
        return await self._run_defined(defined, inputs, node_id, execution_id)

    async def _run_batch(self, request: tuple[Any, ...], budget: float) -> None:
        """``("runs", class_id, batch, node_id, execution_id, define, releases)`` or
        ``("calls", iid, batch, init, releases)``: ``run`` or ``call`` on each input set of
        ``batch`` in order, each with the CPU budget of a call. The values go back in ``("ok",
        values, cpu)`` replies: one at the end, and one whenever ``BATCH_FLUSH_S`` has passed
        since the last (the server draws the next input set's deadline from it). The first
        failure ends the batch (after the values before it), and so does a cancellation,
        before the next input set. Past ``BATCH_TURN_S`` no input set starts: an empty report
        hands the rest back, for the worker's next turn. Health is checked once, at the
        end."""
        generation = self.generation
        run: Callable[[Any], Coroutine[Any, Any, tuple[Any, ...]]]
        if request[0] == RUNS:
            _, class_id, batch, node_id, execution_id, define, releases = request
            if releases:
                await self._release(releases)
            defined, failure = self._defined(class_id, define)
            if failure is not None:
                self._reply(failure)
                return
            if type(node_id) is list:  # one per input set: calls of several executions
                contexts = iter(zip(node_id, execution_id, strict=True))

                def run(inputs: Any) -> Coroutine[Any, Any, tuple[Any, ...]]:
                    own_node_id, own_execution_id = next(contexts)
                    return self._run_defined(defined, inputs, own_node_id, own_execution_id)
            else:
                def run(inputs: Any) -> Coroutine[Any, Any, tuple[Any, ...]]:
                    return self._run_defined(defined, inputs, node_id, execution_id)
        else:
            _, iid, batch, init, releases = request
            hosted = await self._prepare(iid, init, releases)
            if type(hosted) is tuple:
                self._reply(hosted)
                return
            assert isinstance(hosted, _Hosted)

            def run(inputs: Any) -> Coroutine[Any, Any, tuple[Any, ...]]:
                return self._call(hosted, inputs)
        values: list[Any] = []
        last = len(batch) - 1
        began = flushed = time.monotonic()
        failed: tuple[Any, ...] | None = None
        for index, inputs in enumerate(batch):
            if index:
                if self.stopped == generation:
                    failed = error(NODE, "CancelledError", "the call was cancelled",
                                   _isolation.cpu_used(), PROCESS)
                    break
                if time.monotonic() - began >= BATCH_TURN_S:
                    # The turn is over: the rest waits for another (an empty report says so).
                    failed = (OK, [], _isolation.cpu_used_recent())
                    break
                _isolation.set_call_cpu_budget(budget)
            reply = await run(inputs)
            if reply[0] != OK:
                failed = reply
                break
            values.append(reply[1])
            if index < last and time.monotonic() - flushed >= BATCH_FLUSH_S:
                if not self._send_values(values):
                    self._check_health()
                    return
                values = []
                flushed = time.monotonic()
        if failed is None:
            self._send_values(values)
        elif not values or self._send_values(values):
            self._reply(failed, health=False)
        self._check_health()

    def _defined(self, class_id: int, define: tuple[str, str, str] | None,
                 ) -> tuple[Any, tuple[Any, ...] | None]:
        """``((class, params), None)`` for class id ``class_id``, defined now when ``define``
        comes with it; ``(None, error reply)`` when it cannot be loaded, or when the id is
        unknown here (``gone``: the server starts over)."""
        defined = self.defined.get(class_id)
        if defined is None:
            if define is None:
                return None, error(GONE, "", "unknown node class id", _isolation.cpu_used(),
                                   INITIALIZE)
            try:
                defined = self._class_and_params(*define)
            except BaseException as exc:
                return None, _failure(exc, INITIALIZE)
            if len(self.defined) >= MAX_CLASS_IDS:
                self.defined.clear()
            self.defined[class_id] = defined
        return defined, None

    async def _run_defined(self, defined: tuple[Any, Any], inputs: Any, node_id: str,
                           execution_id: str) -> tuple[Any, ...]:
        """Create an instance of a defined class, run its ``process`` on ``inputs``, drop it."""
        try:
            context = NodeContext(node_id=node_id, execution_id=execution_id,
                                  runtime=RUNTIME_NAME, scratch_dir=self.config.scratch_dir)
            node = defined[0](defined[1], context)
        except BaseException as exc:
            return _failure(exc, INITIALIZE)
        # What _run does, inline (one coroutine less per call).
        self.current = _Hosted(node, context)
        try:
            value = node.process(inputs)
            if type(value) is CoroutineType or inspect.isawaitable(value):
                self.awaiting = True
                try:
                    value = await value
                finally:
                    self._settle()
        except BaseException as exc:
            return _failure(exc, PROCESS)
        finally:
            self.current = None
        # A reading up to 10 ms old is fine for the lifetime limit (see cpu_used_recent); one
        # syscall less per call.
        return (OK, value, _isolation.cpu_used_recent())  # ok(), inline: per request

    async def _prepare(self, iid: int, init: tuple[Any, ...] | None,
                       releases: list[int] | None) -> _Hosted | tuple[Any, ...]:
        """Release what the server let go of, create the instance if this request carries its
        ``init``, and return it; or the error reply when that failed."""
        if releases:
            await self._release(releases)
        if init is not None:
            try:
                await self._init(iid, *init)
            except BaseException as exc:
                return _failure(exc, INITIALIZE)
        hosted = self.instances.get(iid)
        if hosted is None:
            return error(GONE, "", "instance not hosted here", _isolation.cpu_used(), PROCESS)
        return hosted

    # --- streaming ----------------------------------------------------------------------------

    async def _stream(self, hosted: _Hosted) -> None:
        node: Any = hosted.node
        method = getattr(type(node), "stream", None)
        is_async = inspect.isasyncgenfunction(method)
        if not is_async and not inspect.isgeneratorfunction(method):
            raise TypeError("stream() must be a generator (use yield)")
        ended = False

        def take() -> Chunk | None:
            nonlocal ended
            if ended:
                return None
            self._send(need_message(_isolation.cpu_used()))
            message = self._receive()
            if message[0] == CHUNK:
                return Chunk(*chunk_fields(message))
            if message[0] == END:
                ended = True
                return None
            raise _StreamStopped

        events_lock = threading.Lock()
        events = _shm.Outbox(inline_max=0, name="tensorline-event",
                             pickler_class=_shm.WorkerPickler)
        # Cleared under the lock when the generator ends: no event (from a thread of the
        # node's) can follow the stream's last reply, which the server would take for a
        # broken protocol.
        streaming = [True]

        def on_event(kind: str, message: str, progress: float) -> None:
            # Any thread; small messages, inline: they never touch the data segment.
            event = event_message(str(kind)[:100], str(message)[:4000], float(progress))
            with events_lock, contextlib.suppress(Exception):
                if not streaming[0]:
                    return
                packed, fresh = _shm.pack(event, events)
                if fresh is None:
                    _shm.send(self.sock, packed, None)

        generator: Any
        if is_async:
            async def apull() -> Any:
                while (chunk := take()) is not None:
                    yield chunk

            generator = node.stream(apull())
        else:
            def pull() -> Any:
                while (chunk := take()) is not None:
                    yield chunk

            generator = node.stream(pull())

        self.current = hosted
        hosted.context.on_event = on_event
        try:
            while True:
                try:
                    out = (await self._await(generator.__anext__()) if is_async
                           else next(generator))
                except (StopIteration, StopAsyncIteration):
                    return
                except _StreamStopped:
                    return
                if isinstance(out, Emit):
                    message = out_message(out.value, int(out.sequence), _isolation.cpu_used())
                else:
                    message = out_message(out, None, _isolation.cpu_used())
                self._send(message)
                if self._receive()[0] != NEXT:
                    return
        finally:
            with events_lock:
                streaming[0] = False
            hosted.context.on_event = None
            try:
                if is_async:
                    await self._await(generator.aclose())
                else:
                    generator.close()
            except Exception as exc:
                with contextlib.suppress(Exception):
                    print(f"tensorline sandbox worker {os.getpid()}: closing the stream of "
                          f"node '{hosted.context.node_id}' failed: {type(exc).__name__}: "
                          f"{exc}", file=sys.stderr, flush=True)
            finally:
                self.current = None
                events.close()

    # --- instances ----------------------------------------------------------------------------

    async def _release(self, iids: list[int]) -> None:
        """Run the cleanup of instances the server released. Nobody waits for the outcome any
        more, so a failure is reported on the worker's stderr (the server's)."""
        for iid in iids:
            hosted = self.instances.pop(iid, None)
            if hosted is not None:
                await self._cleanup(hosted)

    async def _cleanup(self, hosted: _Hosted) -> None:
        try:
            await self._run(hosted, "cleanup")
        except Exception as exc:
            with contextlib.suppress(Exception):
                print(f"tensorline sandbox worker {os.getpid()}: cleanup of node "
                      f"'{hosted.context.node_id}' failed: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)

    def _class_and_params(self, module: str, qualname: str, params_json: str) -> tuple[Any, Any]:
        """The node class and its validated params (both cached)."""
        cls: Any = self.classes.get((module, qualname))
        if cls is None:
            try:
                cls = importlib.import_module(module)
                for part in qualname.split("."):
                    cls = getattr(cls, part)
            except BaseException as exc:
                raise _LoadFailed(MEMORY if isinstance(exc, MemoryError) else IMPORT,
                                  type(exc).__name__,
                                  f"cannot load {module}.{qualname} in the worker: "
                                  f"{describe(exc)}") from exc
            # Before any of the class's code runs (see ``LOADED`` in ``_messages``).
            self._reply(LOADED_MESSAGE, health=False)
            self.classes[(module, qualname)] = cls
        key = (module, qualname, params_json)
        params = self.params.get(key)
        if params is None:
            # Params models are frozen: one validated instance serves every instance created
            # with the same parameters.
            if len(self.params) > 1024:
                self.params.clear()
            params = self.params[key] = cls.Params.model_validate_json(params_json)
        return cls, params

    async def _init(self, iid: int, module: str, qualname: str, params_json: str, node_id: str,
                    execution_id: str) -> None:
        cls, params = self._class_and_params(module, qualname, params_json)
        context = NodeContext(node_id=node_id, execution_id=execution_id, runtime=RUNTIME_NAME,
                              scratch_dir=self.config.scratch_dir)
        hosted = _Hosted(cls(params, context), context)
        try:
            await self._run(hosted, "initialize")
        except BaseException:
            with contextlib.suppress(Exception):
                await self._run(hosted, "cleanup")
            raise
        self.instances[iid] = hosted

    async def _run(self, hosted: _Hosted, name: str, *args: Any) -> Any:
        method: Callable[..., Any] = getattr(hosted.node, name)
        if getattr(method, "__func__", None) in _NO_OPS:
            return None  # the base class's empty initialize/cleanup
        self.current = hosted
        try:
            result = method(*args)
            if type(result) is CoroutineType or inspect.isawaitable(result):
                self.awaiting = True  # what _await does, without its frame
                try:
                    return await result
                finally:
                    self._settle()
            return result
        finally:
            self.current = None

    async def _await(self, awaitable: Any) -> Any:
        """Await a node's coroutine in the serving task itself: one that does not suspend costs
        no loop iteration, and asyncio.current_task()/timeout() work as in any task. While it
        is suspended, a cancellation of the call cancels the serving task (``cancel_current``);
        the cancel count is reset afterwards, so the next call's ``asyncio.timeout`` is not
        confused by it."""
        self.awaiting = True
        try:
            return await awaitable
        finally:
            self._settle()

    def _settle(self) -> None:
        self.awaiting = False
        task = self.task
        if task is not None:
            while task.cancelling():
                task.uncancel()

    # --- cancellation -------------------------------------------------------------------------

    def on_cancel_signal(self, *_: Any) -> None:
        """SIGUSR1 handler. It runs on the main thread at any bytecode boundary, possibly while
        that thread holds the lock inside ``context.cancelled``: it must take no lock itself.
        It only records which call was current; the cancel thread does the rest."""
        with contextlib.suppress(OSError):
            os.write(self.cancel_w, self.generation.to_bytes(8, "little"))

    def cancel_thread(self) -> None:
        while True:
            try:
                data = os.read(self.cancel_r, 8)
            except InterruptedError:
                continue
            if len(data) != 8:
                return
            with self.generation_lock:
                if int.from_bytes(data, "little") == self.generation:
                    self.cancel_current()

    def cancel_current(self) -> None:
        """(Cancel thread, generation lock held.) Sets ``context.cancelled`` now; the serving
        task is cancelled when the loop next runs, i.e. once the node's coroutine suspends,
        provided the same request is still current then."""
        self.stopped = self.generation
        hosted = self.current
        if hosted is not None:
            hosted.context.cancelled.set()
        with contextlib.suppress(RuntimeError):  # the loop is closed: the worker is exiting
            self.loop.call_soon_threadsafe(self._cancel_serving, self.generation)

    def _cancel_serving(self, generation: int) -> None:
        if generation == self.generation and self.awaiting and self.task is not None:
            self.task.cancel()

    async def _cleanup_all(self) -> None:
        for iid in list(self.instances):
            await self._cleanup(self.instances.pop(iid))


def _being_replaced() -> tuple[Any, ...]:
    """The answer to a one-shot request a worker that said it is unhealthy cannot take."""
    return error(GONE, "", "worker is being replaced", _isolation.cpu_used(), PROCESS)


# The base class's initialize and cleanup do nothing: not calling them saves a call per request.
_NO_OPS = frozenset({Node.initialize, Node.cleanup})
