"""The in-process runtime: nodes run in the server's own interpreter, lowest latency.

Async node methods run on the event loop; sync ones in a thread pool, except a sync ``process``
that has proved short (``_inline``: every call of its type under ``inline_sync_max_ms``), which
runs on the loop itself, without the thread hop, until one call of it takes long. A pooled sync
``process`` that is still running when its execution is abandoned (deadline, cancel) cannot be
interrupted: its context's ``cancelled`` event is set and its cleanup runs when it returns. An
inline call cannot be abandoned at all (nothing else runs until it returns), which is why types
with a per-call timeout always run in the pool. ``initialize`` and ``cleanup`` always run in
the pool (model loading and the like).
Reusable nodes are kept warm, one shared instance per (type, params), in an LRU of bounded size
whose eviction runs the instance's cleanup once nobody uses it.

Streaming nodes: an async ``stream`` generator runs on the loop; a sync one runs in a thread of
its own for the whole session (not the shared pool, whose threads a long-lived generator would
starve), handing every input and output across with ``run_coroutine_threadsafe`` so it blocks
only its own thread and never runs more than one output ahead of its consumer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator, Mapping
from typing import Any, ClassVar

from tensorline.server._errors import NodeFailed, PermissionDenied, TensorlineServerError
from tensorline.server.manifest import NodeSpec
from tensorline.server.nodes import Node, NodeContext, NodeEntry
from tensorline.server.runtime._base import (
    ExecutionScope,
    NodeInstance,
    Runtime,
    within_node_timeout,
)
from tensorline.server.runtime._inline import InlinePace, InlinePolicy

log = logging.getLogger(__name__)


def node_failed(spec: NodeSpec, exc: BaseException, sequence: int | None = None) -> NodeFailed:
    return NodeFailed(spec.node_id, type(exc).__name__, str(exc), sequence)


class _Stopped(BaseException):
    """Raised in a sync generator's thread when its session stopped (BaseException, so that a
    node's ``except Exception`` does not swallow it)."""


_DONE: Any = object()


async def _next_or_done(chunks: AsyncIterator[Any]) -> Any:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return _DONE


class _ThreadBridge:
    """Runs coroutines on the loop on behalf of a generator thread; ``stop`` unblocks it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cancelled: threading.Event) -> None:
        self._loop = loop
        self._cancelled = cancelled
        self._stopped = False
        self._tasks: set[asyncio.Task[Any]] = set()

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """From the thread: run ``coro`` on the loop and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(self._guard(coro), self._loop)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise _Stopped from None

    async def _guard(self, coro: Coroutine[Any, Any, Any]) -> Any:
        # Runs on the loop, so it cannot race with stop(): either it sees _stopped or stop()
        # sees its task.
        if self._stopped:
            coro.close()
            raise _Stopped
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            return await coro
        finally:
            self._tasks.discard(task)

    def stop(self) -> None:
        self._stopped = True
        self._cancelled.set()
        for task in self._tasks:
            task.cancel()


async def _process_plain(spec: NodeSpec, node: Node, inputs: Mapping[str, Any]) -> Any:
    try:
        return await node.process(inputs)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise node_failed(spec, exc) from exc


def _timed(pace: InlinePace, method: Callable[..., Any], *args: Any) -> Any:
    """Call a sync method, telling its type's pace how long it took. Timed where it runs (on
    the loop, or in its pool thread: waiting for a thread does not count)."""
    started = time.perf_counter()
    try:
        return method(*args)
    finally:
        pace.ran(time.perf_counter() - started)


class InProcessInstance(NodeInstance):
    can_stream: ClassVar[bool] = True

    def __init__(self, spec: NodeSpec, node: Node, runtime: InProcessRuntime) -> None:
        self.spec = spec
        self.node = node
        self._runtime = runtime
        self.entry: NodeEntry = spec.entry
        self.users = 0
        # Sync calls still running in the thread pool; cleanup waits for them.
        self.running: set[concurrent.futures.Future[Any]] = set()
        self.evicted = False
        # Warm instances: the initialization task that made this instance (it counts the callers
        # still waiting for it), and whether its cleanup was started (exactly once).
        self.warm_task: asyncio.Task[InProcessInstance] | None = None
        self.retired = False

    async def call(self, name: str, is_async: bool, *args: Any,
                   pace: InlinePace | None = None) -> Any:
        method: Callable[..., Any] = getattr(self.node, name)
        if is_async:
            return await method(*args)
        if pace is None:
            future = self._runtime.pool.submit(method, *args)
        elif pace.inline:
            return _timed(pace, method, *args)
        else:
            future = self._runtime.pool.submit(_timed, pace, method, *args)
        self.running.add(future)
        future.add_done_callback(self._call_done)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.node.context.cancelled.set()
            self._reset_cancelled()  # the abandoned call may have finished already
            raise

    def _call_done(self, future: concurrent.futures.Future[Any]) -> None:
        self.running.discard(future)
        self._reset_cancelled()

    def _reset_cancelled(self) -> None:
        """A warm instance outlives its requests: once no abandoned sync call is left running,
        clear ``cancelled`` so the next request does not see an old request's cancellation."""
        if self.entry.reusable and not self.running:
            self.node.context.cancelled.clear()

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        pace = None if self.entry.async_process else self._runtime.inline.pace(
            self.entry, self.spec.timeout_s)
        try:
            return await self.call("process", self.entry.async_process, inputs, pace=pace)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise node_failed(self.spec, exc) from exc

    def _failed(self, exc: Exception) -> Exception:
        # Errors of the executor's own chunk iterator (a join overflow...) pass through as is.
        if isinstance(exc, TensorlineServerError):
            return exc
        return node_failed(self.spec, exc)

    async def stream(self, chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
        method = getattr(type(self.node), "stream", None)
        source: AsyncGenerator[Any, None]
        if inspect.isasyncgenfunction(method):
            source = self._async_stream(chunks)
        elif inspect.isgeneratorfunction(method):
            source = self._sync_stream(chunks)
        else:
            raise node_failed(self.spec, TypeError("stream() must be a generator (use yield)"))
        try:
            async for out in source:
                yield out
        finally:
            await source.aclose()

    async def _async_stream(self, chunks: AsyncIterator[Any]) -> AsyncGenerator[Any, None]:
        node: Any = self.node
        generator = node.stream(chunks)
        try:
            while True:
                try:
                    out = await generator.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    self.node.context.cancelled.set()
                    raise
                except Exception as exc:
                    raise self._failed(exc) from exc
                yield out
        finally:
            try:
                await generator.aclose()
            except Exception:
                log.exception("closing the stream of node %s failed", self.spec.node_id)

    async def _sync_stream(self, chunks: AsyncIterator[Any]) -> AsyncGenerator[Any, None]:
        node: Any = self.node
        loop = asyncio.get_running_loop()
        bridge = _ThreadBridge(loop, self.node.context.cancelled)
        # maxsize=1: the generator runs at most one output ahead of its consumer.
        outputs: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue(maxsize=1)
        finished: concurrent.futures.Future[None] = concurrent.futures.Future()

        def pull() -> Iterator[Any]:
            while True:
                item = bridge.call(_next_or_done(chunks))
                if item is _DONE:
                    return
                yield item

        def body() -> None:
            try:
                for out in node.stream(pull()):
                    bridge.call(outputs.put((out, None)))
                bridge.call(outputs.put((_DONE, None)))
            except _Stopped:
                pass
            except BaseException as exc:
                with contextlib.suppress(_Stopped):
                    bridge.call(outputs.put((_DONE, exc)))
            finally:
                finished.set_result(None)

        # Tracked like a pool call, so the node's cleanup waits for the thread to end.
        self.running.add(finished)
        finished.add_done_callback(self.running.discard)
        threading.Thread(target=body, daemon=True,
                         name=f"tensorline-stream-{self.spec.node_id}").start()
        try:
            while True:
                out, error = await outputs.get()
                if out is _DONE:
                    if error is None:
                        return
                    if isinstance(error, Exception):
                        raise self._failed(error) from error
                    raise error
                yield out
        finally:
            bridge.stop()

    async def initialize(self) -> None:
        if self.entry.has_initialize:
            try:
                await self.call("initialize", self.entry.async_initialize)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise node_failed(self.spec, exc) from exc

    async def cleanup(self) -> None:
        """Run the node's cleanup once every sync call of it has returned."""
        if not self.entry.has_cleanup:
            return
        pending = [asyncio.wrap_future(f) for f in list(self.running)]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        try:
            await self.call("cleanup", self.entry.async_cleanup)
        except Exception:
            log.exception("cleanup of node %s (%s) failed", self.spec.node_id,
                          self.spec.node_type)


# The names of the threads sync nodes run in (what lets the process's exit find them).
NODE_THREAD_PREFIX = "tensorline-node"


class InProcessRuntime(Runtime):
    name: ClassVar[str] = "inprocess"

    def __init__(self, *, threads: int = 8, warm_capacity: int = 32,
                 shutdown_timeout_s: float = 5.0, inline_max_s: float = 0.001) -> None:
        self._shutdown_timeout_s = shutdown_timeout_s
        self.inline = InlinePolicy(inline_max_s)
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix=NODE_THREAD_PREFIX
        )
        self._warm_capacity = warm_capacity
        self._warm: OrderedDict[str, asyncio.Task[InProcessInstance]] = OrderedDict()
        # Cleanups that outlive their request (deferred while a sync call still runs).
        self._background: set[asyncio.Task[None]] = set()
        # Callers waiting for each warm initialization task: an instance evicted while it
        # initializes must not be cleaned up before they had their turn.
        self._waiters: dict[asyncio.Task[InProcessInstance], int] = {}
        self._closed = False

    async def call(self, spec: NodeSpec, scope: ExecutionScope,
                   inputs: Mapping[str, Any]) -> Any:
        entry = spec.entry
        if not (entry.reusable or entry.has_initialize or entry.has_cleanup):
            # A fresh instance with nothing to initialize or clean up, run on the loop: create
            # it and await its process (or, for a sync one that runs inline, call it), without
            # the instance bookkeeping acquire/release keep for the general case (a sync call
            # that may outlive its request, a cleanup).
            if entry.async_process:
                if spec.timeout_s is None:
                    return await _process_plain(spec, self._new_node(spec, scope), inputs)
                return await within_node_timeout(
                    spec, _process_plain(spec, self._new_node(spec, scope), inputs))
            pace = self.inline.pace(entry, spec.timeout_s)
            if pace.inline:  # no timeout: see InlinePolicy.pace
                node = self._new_node(spec, scope)
                try:
                    return _timed(pace, node.process, inputs)
                except Exception as exc:
                    raise node_failed(spec, exc) from exc
        return await super().call(spec, scope, inputs)

    async def acquire(self, spec: NodeSpec, scope: ExecutionScope) -> InProcessInstance:
        if spec.entry.reusable:
            return await self._acquire_warm(spec, scope)
        instance = self._create(spec, scope)
        try:
            await instance.initialize()
        except BaseException:
            await self._finish(instance)
            raise
        return instance

    def _create(self, spec: NodeSpec, scope: ExecutionScope) -> InProcessInstance:
        return InProcessInstance(spec, self._new_node(spec, scope), self)

    def _new_node(self, spec: NodeSpec, scope: ExecutionScope) -> Node:
        cls, params = spec.entry.cls, spec.params
        if cls is None or params is None:
            # A node of an untrusted module: its class exists in sandboxed workers only (the
            # selector never sends one here; this keeps it so if that ever changed).
            raise PermissionDenied(f"node '{spec.node_id}' ({spec.node_type}) comes from "
                                   f"untrusted module {spec.entry.module} and cannot run "
                                   "in-process")
        context = NodeContext(node_id=spec.node_id, execution_id=scope.execution_id,
                              runtime=self.name)
        if scope.extra:
            report = scope.extra.get("on_event")
            if report is not None and not spec.entry.reusable:
                # Not for warm instances: they outlive the session that created them.
                context.on_event = functools.partial(report, spec.node_id)
        try:
            return cls(params, context)
        except Exception as exc:
            raise node_failed(spec, exc) from exc

    async def _acquire_warm(self, spec: NodeSpec, scope: ExecutionScope) -> InProcessInstance:
        key = spec.warm_key
        task = self._warm.get(key)
        if task is not None and task.done() and not task.cancelled() and (
                task.exception() is None):
            # Warm and ready (the steady state): nothing to wait for, nobody to count.
            self._warm.move_to_end(key)
            instance = task.result()
            instance.warm_task = task
            instance.users += 1
            return instance
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            # One initialization per key, however many requests arrive at once; shielded so a
            # cancelled first caller does not abort it for everybody else.
            task = asyncio.ensure_future(self._init_warm(spec, scope))
            self._warm[key] = task
            self._evict()
        self._warm.move_to_end(key)
        self._waiters[task] = self._waiters.get(task, 0) + 1
        try:
            instance = await asyncio.shield(task)
            instance.warm_task = task
            instance.users += 1
            return instance
        except asyncio.CancelledError:
            raise
        except Exception:
            if self._warm.get(key) is task:
                del self._warm[key]
            raise
        finally:
            self._waiters[task] -= 1
            if not self._waiters[task]:
                del self._waiters[task]
            self._retire_if_idle(task)

    async def _init_warm(self, spec: NodeSpec, scope: ExecutionScope) -> InProcessInstance:
        instance = self._create(spec, scope)
        try:
            await instance.initialize()
        except BaseException:
            await instance.cleanup()
            raise
        log.info("warm instance of %s ready (%s)", spec.node_type, spec.params_key)
        return instance

    def _evict(self) -> None:
        while len(self._warm) > self._warm_capacity:
            _, task = self._warm.popitem(last=False)
            self._retire(task)

    def _retire(self, task: asyncio.Task[InProcessInstance]) -> None:
        if not task.done():
            task.add_done_callback(lambda t: self._retire(t))
            return
        if task.cancelled() or task.exception() is not None:
            return
        task.result().evicted = True
        self._retire_if_idle(task)

    def _retire_if_idle(self, task: asyncio.Task[InProcessInstance]) -> None:
        """Clean up an evicted warm instance once nobody uses or awaits it; exactly once."""
        if not task.done() or task.cancelled() or task.exception() is not None:
            return
        instance = task.result()
        if (instance.evicted and not instance.retired and instance.users == 0
                and not self._waiters.get(task)):
            instance.retired = True
            self._spawn(instance.cleanup())

    async def release(self, instance: NodeInstance) -> None:
        assert isinstance(instance, InProcessInstance)
        if instance.spec.entry.reusable:
            instance.users -= 1
            if instance.warm_task is not None:
                self._retire_if_idle(instance.warm_task)
            return
        await self._finish(instance)

    async def _finish(self, instance: InProcessInstance) -> None:
        if not instance.entry.has_cleanup:
            return
        if instance.running:
            # A sync call is still running (abandoned by a deadline/cancel): clean up after it,
            # without holding the caller.
            self._spawn(instance.cleanup())
            return
        await asyncio.shield(self._spawn(instance.cleanup()))

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Initializations still running are stopped (their instance is cleaned up on the way out)
        # rather than left to finish after the pool is gone.
        initializing = [task for task in self._warm.values() if not task.done()]
        for task in initializing:
            task.cancel()
        for task in list(self._warm.values()):
            self._retire(task)
        self._warm.clear()
        # A sync node that ignores `context.cancelled` cannot be interrupted: wait a bounded time
        # for it and its cleanup, then give up on it so the server can still exit.
        pending = {*initializing, *self._background}
        loop = asyncio.get_running_loop()
        end = loop.time() + self._shutdown_timeout_s
        while pending and loop.time() < end:
            _, pending = await asyncio.wait(pending, timeout=end - loop.time())
            pending |= {t for t in self._background if not t.done()}
        if pending:
            log.warning("shutdown: %d node call(s)/cleanup(s) still running after %.1f s; "
                        "abandoning them", len(pending), self._shutdown_timeout_s)
        self.pool.shutdown(wait=False, cancel_futures=True)


    def warm_instances(self) -> int:
        return len(self._warm)

    def stats(self) -> dict[str, float]:
        return self.inline.stats()
