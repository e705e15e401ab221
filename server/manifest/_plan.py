"""The compiled execution plan: everything a request needs, computed once per manifest."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from tensorline.server.nodes import NodeEntry, NodeParams, Port
from tensorline.server.selector import RuntimeDecision


@dataclass(frozen=True, slots=True)
class Source:
    """Where one value of an input port comes from: another node's output port."""

    node_id: str
    port: str


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node of a plan: its registry entry, validated params and where it runs."""

    node_id: str
    entry: NodeEntry
    # None for a node of an untrusted module: its params model exists only in the sandbox,
    # which builds it from ``params_key``.
    params: NodeParams | None
    # Canonical JSON of the params: with the node type, the key of warm reusable instances.
    params_key: str
    decision: RuntimeDecision
    timeout_s: float | None
    # Input port -> connected sources, in manifest order (empty: fed by the request).
    wiring: dict[str, tuple[Source, ...]]

    @property
    def node_type(self) -> str:
        return self.entry.node_type

    @property
    def input_ports(self) -> dict[str, Port]:
        return {p.name: p for p in self.entry.inputs}

    @property
    def output_ports(self) -> dict[str, Port]:
        return {p.name: p for p in self.entry.outputs}

    @property
    def warm_key(self) -> str:
        return f"{self.entry.node_type}:{self.params_key}"


@dataclass(frozen=True, slots=True)
class ExecutionPlan:
    name: str
    nodes: dict[str, NodeSpec]
    # Topological order (a node after everything it depends on).
    order: tuple[str, ...]
    # (node, port) pairs the request must/may feed.
    external_inputs: tuple[tuple[str, str], ...]
    required_inputs: frozenset[tuple[str, str]]
    # (node, port) pairs returned to the client: every output port no connection consumes.
    sinks: tuple[tuple[str, str], ...]
    # node -> nodes that consume its outputs.
    dependents: dict[str, tuple[str, ...]]
    metadata: dict[str, Any] = field(default_factory=dict)
    # How a request may address each external input: (node, port) and, for a node with one,
    # (node, ""); the quick path of input binding (anything else is explained by the slow one).
    request_ports: dict[tuple[str, str], Port] = field(default_factory=dict)


class PlanCache:
    """LRU cache of compiled plans keyed by the manifest text, bounded by entries and by the
    total length of the texts it keys on (a plan's memory grows with its manifest's size, so a
    few huge manifests must not hold what many small ones would)."""

    def __init__(self, capacity: int, max_bytes: int = 0) -> None:
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._bytes = 0
        self._plans: OrderedDict[str, ExecutionPlan] = OrderedDict()

    def get(self, key: str) -> ExecutionPlan | None:
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
        return plan

    def put(self, key: str, plan: ExecutionPlan) -> None:
        if self._capacity <= 0 or (self._max_bytes and len(key) > self._max_bytes):
            return
        if key not in self._plans:
            self._bytes += len(key)
        self._plans[key] = plan
        self._plans.move_to_end(key)
        while len(self._plans) > self._capacity or (self._max_bytes
                                                    and self._bytes > self._max_bytes):
            evicted, _ = self._plans.popitem(last=False)
            self._bytes -= len(evicted)

    @property
    def bytes(self) -> int:
        """Total length of the manifest texts held."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._plans)
