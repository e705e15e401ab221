"""The runtime interface: where a node instance lives and how it is called.

The executor talks only to this interface; the selector decides which implementation serves a
node. A runtime creates (or reuses, for reusable nodes) an initialized instance in ``acquire``,
calls it through ``NodeInstance.process`` and finishes it in ``release``, which always runs its
cleanup for a non-reusable instance, also after errors and cancellation. ``call`` does the three
for one request, with the node's timeout around ``process``; a runtime may override it with a
cheaper path that keeps those guarantees (the in-process runtime does for plain async nodes).

Errors a runtime raises: ``NodeFailed`` for the node's own exceptions, ``SandboxFailure`` when the
isolation itself failed (worker crash, limit hit), ``DeadlineExceeded`` for node timeouts.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from tensorline.server._errors import DeadlineExceeded
from tensorline.server.manifest import NodeSpec


@dataclass(frozen=True, slots=True)
class LayerStatus:
    """One isolation layer and whether it is in force (for logs and GetServerInfo)."""

    name: str
    active: bool
    detail: str = ""


@dataclass(slots=True)
class ExecutionScope:
    """Identity of one execution (a unary call or a streaming session)."""

    execution_id: str
    # Absolute loop time by which the execution must end (None = no deadline).
    deadline: float | None = None
    # Who asked (the peer, or the authenticated principal): the sandbox serves waiting callers
    # round robin by it; empty means each execution is a caller of its own.
    caller: str = ""
    # "on_event": (node_id, kind, message, progress) -> None, callable from any thread; a
    # runtime hands it to the node's context (``NodeContext.report``) for streaming sessions.
    extra: dict[str, Any] = field(default_factory=dict)


class BatchOutcome(NamedTuple):
    """What running a node on a batch of input sets came to: the values of those that ran, in
    order, and the failure that ended the batch early (None: every input set ran). The failure
    is that of the input set after the last value, or, when ``span`` > 1, of one of the
    ``span`` input sets from there: a sandbox worker that dies in the middle of a batch takes
    with it the values it had not reported yet, and which input set was running."""

    values: list[Any]
    failure: Exception | None
    span: int = 1


class NodeInstance(ABC):
    """An initialized node, ready to process."""

    spec: NodeSpec
    # Whether ``stream`` is implemented (streaming sessions refuse streaming nodes otherwise).
    can_stream: ClassVar[bool] = False

    @abstractmethod
    async def process(self, inputs: Mapping[str, Any]) -> Any:
        """Run the node once; returns what the node's ``process`` returned."""

    # Whether ``process_batch`` does better than one ``process`` after another (a stream
    # session hands a batch only to such instances).
    batches: ClassVar[bool] = False

    async def process_batch(self, batch: Sequence[Mapping[str, Any]]) -> BatchOutcome:
        """``process`` on each input set of ``batch`` in order, up to the first failure. Each
        input set gets the deadline a ``process`` call would have."""
        return await one_by_one(self.process, batch)

    def stream(self, chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Run a streaming node's ``stream`` generator over ``chunks`` (``nodes.Chunk``).

        Yields exactly what the generator yields, in order, as it yields it; a node exception
        becomes ``NodeFailed``. The consumer pulls at its own pace and the generator must not
        run ahead by more than one output (backpressure). Closing the returned iterator
        (``aclose``, or cancelling its consumer) stops the generator promptly and sets the
        node context's ``cancelled``. ``chunks`` is consumed only from within this iterator.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot run streaming nodes")


class Runtime(ABC):
    name: ClassVar[str]

    async def start(self) -> None:
        """Prepare (e.g. start workers) before requests arrive."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Stop everything; idempotent, awaits every task it started."""

    @abstractmethod
    async def acquire(self, spec: NodeSpec, scope: ExecutionScope) -> NodeInstance:
        """An initialized instance for ``spec`` (fresh, or warm for reusable nodes)."""

    @abstractmethod
    async def release(self, instance: NodeInstance) -> None:
        """Return a warm instance or clean up a fresh one (deferred while it still runs)."""

    async def call(self, spec: NodeSpec, scope: ExecutionScope,
                   inputs: Mapping[str, Any]) -> Any:
        """Run the node of ``spec`` once: acquire, process (within the node's timeout),
        release (always). Returns what the node's ``process`` returned."""
        instance = await self.acquire(spec, scope)
        try:
            return await within_node_timeout(spec, instance.process(inputs))
        finally:
            await self.release(instance)

    async def call_batch(self, spec: NodeSpec, scope: ExecutionScope,
                         batch: Sequence[Mapping[str, Any]]) -> BatchOutcome:
        """``call`` on each input set of ``batch`` in order, up to the first failure."""
        return await one_by_one(lambda inputs: self.call(spec, scope, inputs), batch)

    async def prepare(self, spec: NodeSpec, scope: ExecutionScope) -> None:
        """Create what a call of ``spec`` needs before the first call arrives (a named
        pipeline is warmed this way before it takes traffic): a reusable node's warm instance
        stays, a fresh one is created (its ``initialize`` runs) and released, so a node that
        cannot be built fails here rather than on a request."""
        instance = await self.acquire(spec, scope)
        await self.release(instance)

    def layers(self) -> list[LayerStatus]:
        return []

    def healthy(self) -> bool:
        return True

    def stats(self) -> dict[str, float]:
        """Counters for the metrics endpoint, e.g. {"worker_restarts": 3, "workers": 2}."""
        return {}


async def one_by_one(run: Callable[[Mapping[str, Any]], Awaitable[Any]],
                     batch: Sequence[Mapping[str, Any]]) -> BatchOutcome:
    """``run`` on each input set of ``batch`` in order, up to the first failure: a batch
    without batching."""
    values: list[Any] = []
    for inputs in batch:
        try:
            values.append(await run(inputs))
        except Exception as exc:
            return BatchOutcome(values, exc)
    return BatchOutcome(values, None)


async def within_node_timeout(spec: NodeSpec, call: Awaitable[Any]) -> Any:
    """Await ``call`` within the node's own timeout (``DeadlineExceeded`` naming the node)."""
    if spec.timeout_s is None:
        return await call
    try:
        async with asyncio.timeout(spec.timeout_s):
            return await call
    except TimeoutError:
        raise DeadlineExceeded(
            f"node '{spec.node_id}' exceeded its timeout of {spec.timeout_s:g} s") from None
