"""The pipeline engine: the server's core without the gRPC layer.

It owns the registry, the selector, the plan cache, the runtimes and the executor, so that the
service (and tests) drive pipelines through one object; the CLI's local ``nodes`` lists the
catalogue of a ``local()`` engine. The CLI's ``validate`` does not use it: it runs the compiler
alone (``manifest.compile_manifest``), with a selector of its own.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tensorline.server._errors import LayerMissing, RequestInvalid, clip
from tensorline.server.executor._executor import ExecutionResult, Executor
from tensorline.server.executor._session import StreamingExecutor
from tensorline.server.manifest import (
    ExecutionPlan,
    ManifestLimits,
    PlanCache,
    bind_inputs,
    compile_manifest,
    parse_manifest_json,
)
from tensorline.server.nodes import NodeDescription, NodeRegistry, entry_of
from tensorline.server.runtime import (
    ExecutionScope,
    InProcessRuntime,
    ModuleUnavailable,
    Runtime,
    SandboxRuntime,
)
from tensorline.server.selector import INPROCESS, SANDBOX, Selector
from tensorline.wire import PortItem, Violation

log = logging.getLogger(__name__)


# A plan's decisions are logged node by node up to this many; the rest as a count.
LOGGED_NODES = 32


def _log_plan(plan: ExecutionPlan) -> None:
    """Where the nodes of a new plan run. Names and ids come from the request: clipped, and
    a manifest of thousands of nodes logs a bounded number of lines."""
    name = clip(plan.name, 80)
    for spec in list(plan.nodes.values())[:LOGGED_NODES]:
        log.info("plan %r: node %s (%s) runs %s: %s", name, clip(spec.node_id, 80),
                 clip(spec.node_type, 80), spec.decision.runtime, spec.decision.reason)
    if len(plan.nodes) > LOGGED_NODES:
        log.info("plan %r: %d more nodes", name, len(plan.nodes) - LOGGED_NODES)


@dataclass(slots=True)
class PlanLookup:
    plan: ExecutionPlan
    cached: bool


class PipelineEngine:
    def __init__(
        self,
        registry: NodeRegistry,
        selector: Selector,
        runtimes: Mapping[str, Runtime],
        *,
        plan_cache_size: int = 256,
        plan_cache_bytes: int = 0,
        limits: ManifestLimits | None = None,
        model_roots: Sequence[str] = (),
    ) -> None:
        if INPROCESS not in runtimes:
            raise ValueError("the in-process runtime is required")
        self.registry = registry
        self.selector = selector
        self.runtimes = dict(runtimes)
        self.plans = PlanCache(plan_cache_size, plan_cache_bytes)
        self.limits = limits or ManifestLimits()
        # Where model files named in params may come from (``nodes.ModelPath``).
        self.model_roots = tuple(model_roots)
        self.executor = Executor(self.runtimes, selector)
        self.streaming = StreamingExecutor(self.runtimes, selector)
        self._started = False
        self._closed = False

    @classmethod
    def local(cls, registry: NodeRegistry | None = None) -> PipelineEngine:
        """An engine with only the in-process runtime (for validation and tools)."""
        return cls(registry or NodeRegistry.default(), Selector(), {INPROCESS: InProcessRuntime()})

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        for name, runtime in list(self.runtimes.items()):
            if name == INPROCESS:
                await runtime.start()
                continue
            try:
                await runtime.start()
            except Exception:
                # A server without its sandbox still serves trusted nodes in-process; the
                # selector refuses untrusted ones (PERMISSION_DENIED) and says why.
                log.exception("the %s runtime could not start; continuing without it", name)
                await runtime.shutdown()
                del self.runtimes[name]
                self.selector.sandbox_available = False

    async def load_untrusted(self, modules: Sequence[str]) -> None:
        """Register the nodes of the untrusted ``modules`` from their description by sandboxed
        workers (each module in its own trust domain), never by importing them here: their
        top-level code must not run in the server. Call after ``start``. A module that cannot
        be loaded is logged and named in ``registry.unavailable`` (and so in "unknown node
        type" errors); the others load regardless."""
        modules = list(dict.fromkeys(modules))
        if not modules:
            return
        sandbox = self.runtimes.get(SANDBOX)
        if not isinstance(sandbox, SandboxRuntime):
            for module in modules:
                self._not_loaded(module, "this server has no sandbox runtime (disabled by "
                                         "configuration, or it failed to start), and untrusted "
                                         "modules are only ever loaded in the sandbox")
            return
        results = await asyncio.gather(*(sandbox.describe_module(m) for m in modules),
                                       return_exceptions=True)
        for module, result in zip(modules, results, strict=True):
            if isinstance(result, LayerMissing):
                self.registry.refused.add(module)
                self._not_loaded(module, result.message)
            elif isinstance(result, ModuleUnavailable):
                self._not_loaded(module, result.cause)
            elif isinstance(result, Exception):
                log.error("describing untrusted module %s failed", module, exc_info=result)
                self._not_loaded(module, f"{type(result).__name__}: {result}")
            elif isinstance(result, BaseException):
                raise result
            else:
                self._register_untrusted(module, result, sandbox)

    def _register_untrusted(self, module: str, descriptions: list[NodeDescription],
                            sandbox: SandboxRuntime) -> None:
        added = []
        for description in descriptions:
            try:
                self.registry.add(entry_of(description, module,
                                           memory_mb_max=sandbox.memory_mb_default,
                                           timeout_s_max=sandbox.call_timeout_s))
            except ValueError as exc:
                log.error("untrusted module %s: node type %r rejected: %s", module,
                          description.node_type, exc)
                continue
            added.append(description.node_type)
        log.info("loaded %d node(s) from %s (untrusted: described by a sandboxed worker)",
                 len(added), module)

    def _not_loaded(self, module: str, why: str) -> None:
        log.error("untrusted node module %s NOT loaded: %s", module, why)
        self.registry.unavailable[module] = why

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for runtime in self.runtimes.values():
            try:
                await runtime.shutdown()
            except Exception:
                log.exception("shutting down the %s runtime failed", runtime.name)

    def plan_for(self, manifest_json: str) -> PlanLookup:
        """The compiled plan of a manifest; compiled and validated once per distinct text."""
        plan = self.plans.get(manifest_json)
        if plan is not None:
            return PlanLookup(plan, True)
        plan = compile_manifest(parse_manifest_json(manifest_json, self.limits), self.registry,
                                self.selector, model_roots=self.model_roots)
        self.plans.put(manifest_json, plan)
        _log_plan(plan)
        return PlanLookup(plan, False)

    def lookup(self, manifest_json: str, prior: Sequence[Violation] = ()) -> PlanLookup:
        """``plan_for``, with the request's earlier problems (``prior``) reported together with
        the manifest's."""
        try:
            return self.plan_for(manifest_json)
        except RequestInvalid as exc:
            if not prior:
                raise
            raise RequestInvalid([*prior, *exc.violations], "invalid request") from None

    async def execute(
        self,
        manifest_json: str,
        inputs: Sequence[PortItem],
        *,
        prior: Sequence[Violation] = (),
        scope: ExecutionScope | None = None,
    ) -> tuple[ExecutionResult, bool]:
        """Run a manifest once. Returns the result and whether the plan came from the cache."""
        lookup = self.lookup(manifest_json, prior)
        result = await self.execute_plan(lookup.plan, inputs, prior=prior, scope=scope)
        return result, lookup.cached

    def execute_plan(
        self,
        plan: ExecutionPlan,
        inputs: Sequence[PortItem],
        *,
        prior: Sequence[Violation] = (),
        scope: ExecutionScope | None = None,
    ) -> Awaitable[ExecutionResult]:
        """Run an already compiled plan once (a named pipeline of the repository, or a plan
        ``plan_for`` returned): await the result. Not a coroutine itself: the inputs are bound
        (and refused, raising here) before it returns the executor's run, which saves the
        request path a coroutine frame of its own."""
        bound = bind_inputs(plan, inputs, prior)
        return self.executor.run(plan, bound, scope or ExecutionScope(
            execution_id=uuid.uuid4().hex))

    async def warm_plan(self, plan: ExecutionPlan, scope: ExecutionScope | None = None) -> None:
        """Create ``plan``'s node instances in the runtimes that will run them (warm reusable
        instances stay there), so its first call pays no initialization; raises what a call
        would raise when a node cannot be created."""
        await self.executor.prepare(plan, scope or ExecutionScope(
            execution_id=f"warm-{uuid.uuid4().hex}"))

    def compile(self, manifest: Mapping[str, Any]) -> ExecutionPlan:
        """Validate and compile a manifest object outside the plan cache (the repository keeps
        its named pipelines' plans itself)."""
        plan = compile_manifest(manifest, self.registry, self.selector,
                                model_roots=self.model_roots)
        _log_plan(plan)
        return plan

    def healthy(self) -> bool:
        return not self._closed and all(r.healthy() for r in self.runtimes.values())
