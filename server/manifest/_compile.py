"""Manifest validation and compilation into an ``ExecutionPlan``.

Every problem is collected before anything is reported, so a user fixes a manifest in one round:
unknown fields (with a "did you mean"), duplicate ids, unknown node types (listing the known
ones), bad params (node id + field path), bad runtime hints, connections to missing nodes or
ports, ports fed twice, and cycles (with the cycle path).

A declaration with an unknown or invalid field (the manifest itself, a node, a connection) is
reported and then checked without that field, so one typo hides nothing else and causes no
false problem: a node keeps its id for the connection checks, its params are not checked when
they may be what was misspelled, and a connection with a dropped field is checked only for the
nodes it names.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from tensorline.server._errors import RequestInvalid, Violation, clip
from tensorline.server.manifest._inputs import default_port
from tensorline.server.manifest._model import (
    CONNECTION_FIELDS,
    MANIFEST_FIELDS,
    NODE_FIELDS,
    ConnectionDecl,
    ManifestDecl,
    NodeDecl,
)
from tensorline.server.manifest._plan import ExecutionPlan, NodeSpec, Source
from tensorline.server.nodes import (
    NodeEntry,
    NodeParams,
    NodeRegistry,
    Port,
    SchemaViolation,
    UnknownNodeType,
    model_roots_context,
    needs_message,
    schema_violations,
)
from tensorline.server.selector import Selector, normalize_hint
from tensorline.wire import JsonRejected, loads


def _loc(prefix: str, loc: Sequence[int | str]) -> str:
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


# "Did you mean" compares a name with every candidate (difflib, quadratic in the worst case):
# offered for the first few problems of a manifest, with few enough candidates, for names of
# sane length, so a manifest of thousands of broken references still compiles in linear time.
MAX_HINTS = 16
MAX_HINT_CANDIDATES = 2000
MAX_HINT_NAME = 128


class _Hints:
    """The "did you mean" budget of one compilation."""

    def __init__(self) -> None:
        self.left = MAX_HINTS

    def available(self, name: str, candidates: int) -> bool:
        if self.left <= 0 or candidates > MAX_HINT_CANDIDATES or len(name) > MAX_HINT_NAME:
            return False
        self.left -= 1
        return True

    def __call__(self, name: str, known: Sequence[str]) -> str:
        if not self.available(name, len(known)):
            return ""
        close = difflib.get_close_matches(name, known, n=1)
        return f" (did you mean '{close[0]}'?)" if close else ""


def _pydantic_violations(
    prefix: str, error: ValidationError, known: Sequence[str], hints: _Hints, who: str = ""
) -> list[Violation]:
    out = []
    for err in error.errors():
        loc = err["loc"]
        if err["type"] == "extra_forbidden" and loc:
            name = str(loc[-1])
            desc = f"unknown field '{clip(name)}'{hints(name, known)}"
        else:
            desc = err["msg"]
        out.append(Violation(_loc(prefix, loc), f"{who}{desc}"))
    return out


def _validate(model: type[BaseModel], data: Any, prefix: str, known: Sequence[str],
              out: list[Violation], hints: _Hints, who: str = "",
              context: Mapping[str, Any] | None = None) -> Any:
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        out.extend(_pydantic_violations(prefix, exc, known, hints, who))
        return None


def _validate_rest(model: type[BaseModel], data: Mapping[str, Any], prefix: str,
                   known: Sequence[str], out: list[Violation],
                   hints: _Hints) -> tuple[Any, frozenset[str]]:
    """``model`` from ``data`` with every problem reported, and the fields left out. A field
    that is unknown (a typo) or invalid is reported, then left out (at its default) so that
    the rest of the declaration is still checked and a node keeps its id for the connection
    checks; None when a required field is itself the problem."""
    try:
        return model.model_validate(data), frozenset()
    except ValidationError as exc:
        out.extend(_pydantic_violations(prefix, exc, known, hints))
        errors = exc.errors()
    dropped = frozenset(str(err["loc"][0]) for err in errors if err["loc"])
    if not dropped or any(not err["loc"] for err in errors):  # not a mapping at all
        return None, dropped
    try:
        rest = model.model_validate({k: v for k, v in data.items() if k not in dropped})
    except ValidationError:  # a required field was the problem: reported above
        return None, dropped
    return rest, dropped


def _validate_params(entry: NodeEntry, data: dict[str, Any], prefix: str,
                     out: list[Violation], hints: _Hints, who: str,
                     context: Mapping[str, Any]) -> tuple[NodeParams | None, str] | None:
    """The node's validated params and their canonical JSON (the key of warm instances and
    what a sandbox worker builds the params from), or None after adding the violations.
    ``context``: the pydantic validation context (the model roots ``ModelPath`` params
    resolve against; their canonical JSON holds the resolved path)."""
    if entry.cls is not None:
        model = entry.cls.Params
        value = _validate(model, data, prefix, tuple(model.model_fields), out, hints, who,
                          context)
        return None if value is None else (value, value.model_dump_json())
    # An untrusted node: the server has its exported JSON schema, never its pydantic model.
    # Custom validators of its Params therefore run only in the sandbox, when the worker
    # creates the node from these params; a failure there is a node error naming the node.
    schema_json = entry.params_schema_json()
    found = schema_violations(schema_json, data)
    if found:
        known = tuple(json.loads(schema_json).get("properties", {}))
        out.extend(_schema_violations(prefix, found, known, hints, who))
        return None
    return None, json.dumps(data, sort_keys=True, separators=(",", ":"))


def _schema_violations(prefix: str, found: Sequence[SchemaViolation], known: Sequence[str],
                       hints: _Hints, who: str) -> list[Violation]:
    """JSON schema violations in the words the pydantic path uses for the same problems."""
    out = []
    for v in found:
        desc = v.message
        if v.kind == "unknown" and v.loc:
            name = str(v.loc[-1])
            desc = f"unknown field '{clip(name)}'{hints(name, known)}"
        out.append(Violation(_loc(prefix, v.loc), f"{who}{desc}"))
    return out



@dataclass(frozen=True, slots=True)
class ManifestLimits:
    """Bounds on what a manifest may be (0 = unbounded): its size in UTF-8 bytes and how deeply
    its arrays and objects nest (params included)."""

    max_manifest_bytes: int = 0
    max_json_depth: int = 0


def parse_manifest_json(text: str, limits: ManifestLimits = ManifestLimits()) -> dict[str, Any]:
    """The manifest JSON object; RequestInvalid when it is not valid JSON, not an object, or
    beyond ``limits``."""
    max_bytes = limits.max_manifest_bytes
    if not text.strip():
        raise RequestInvalid([Violation("manifest_json", "empty manifest")], "invalid manifest")
    if max_bytes and len(text) > max_bytes // 4 and len(text.encode()) > max_bytes:
        raise RequestInvalid([Violation("manifest_json", f"{len(text.encode())} bytes exceed "
                                        f"the server limit of {max_bytes} bytes", kind="limit")],
                             "manifest too large")
    try:
        data = loads(text, max_depth=limits.max_json_depth)
    except JsonRejected as exc:
        raise RequestInvalid([Violation("manifest_json", exc.reason,
                                        kind="limit" if exc.limit else "invalid")],
                             "invalid manifest") from None
    if not isinstance(data, dict):
        raise RequestInvalid(
            [Violation("manifest_json", f"must be a JSON object, got {type(data).__name__}")],
            "invalid manifest",
        )
    return data


def compile_manifest(
    data: Mapping[str, Any], registry: NodeRegistry, selector: Selector, *,
    model_roots: Sequence[str] = (),
) -> ExecutionPlan:
    """Validate a manifest completely and compile it. Raises RequestInvalid with every problem,
    or PermissionDenied when the trust policy refuses a node's runtime hint. ``model_roots``:
    the directories model files named in params (``ModelPath``) may come from; a path that
    leads out of them is a violation of that param.

    Four phases: parse the manifest's own fields, check the nodes (declarations, then params),
    wire the connections (then look for cycles), and, when nothing was found, decide each
    node's runtime and build the plan."""
    problems: list[Violation] = []
    hints = _Hints()
    manifest = _parse(data, problems, hints)
    declared = _check_nodes(manifest, registry, problems, hints)
    params = _check_params(declared, problems, hints, model_roots_context(model_roots))
    wiring, consumed = _wire_connections(manifest, declared, problems, hints)
    _check_cycles(wiring, problems)
    if problems:
        raise RequestInvalid(problems, "invalid manifest")
    nodes = _decide_runtimes(declared, params, wiring, selector)
    return _build_plan(manifest, nodes, consumed)


@dataclass(slots=True)
class _Declared:
    """The nodes a manifest declares, as far as their declarations could be read."""

    # Node id -> (index in ``nodes``, declaration, registered entry or None when unknown).
    decls: dict[str, tuple[int, NodeDecl, NodeEntry | None]] = field(default_factory=dict)
    # Nodes whose declaration is broken beyond use: their problems are reported, and
    # connections naming them are not reported again as naming no node.
    unusable: set[str] = field(default_factory=set)
    # Nodes declared with a field left out: their params may be under a misspelled name.
    unchecked_params: set[str] = field(default_factory=set)


def _parse(data: Mapping[str, Any], problems: list[Violation], hints: _Hints) -> ManifestDecl:
    """The manifest's own fields; RequestInvalid at once when they are unusable."""
    manifest: ManifestDecl | None
    manifest, _ = _validate_rest(ManifestDecl, data, "", MANIFEST_FIELDS, problems, hints)
    if manifest is None:
        raise RequestInvalid(problems, "invalid manifest")
    return manifest


def _check_nodes(manifest: ManifestDecl, registry: NodeRegistry, problems: list[Violation],
                 hints: _Hints) -> _Declared:
    """Each node declaration: its fields, a unique id, a known node type, a valid runtime hint."""
    declared = _Declared()
    decls = declared.decls
    for index, raw in enumerate(manifest.nodes):
        prefix = f"nodes[{index}]"
        decl, dropped = _validate_rest(NodeDecl, raw, prefix, NODE_FIELDS, problems, hints)
        if decl is None:
            if isinstance(raw.get("id"), str):
                declared.unusable.add(raw["id"])
            continue
        if decl.id in decls:
            first = decls[decl.id][0]
            problems.append(Violation(f"{prefix}.id", f"duplicate node id '{decl.id}' "
                                                      f"(first used by nodes[{first}])"))
            continue
        if dropped and "params" not in raw:
            declared.unchecked_params.add(decl.id)
        entry = _node_entry(registry, decl, f"{prefix}.node_type", problems, hints)
        try:
            normalize_hint(decl.runtime_hint)
        except ValueError as exc:
            problems.append(Violation(f"{prefix}.runtime_hint", f"node '{decl.id}': {exc}"))
        decls[decl.id] = (index, decl, entry)
    return declared


def _check_params(declared: _Declared, problems: list[Violation], hints: _Hints,
                  context: Mapping[str, Any]) -> dict[str, tuple[NodeParams | None, str]]:
    """Each known node's params (node id -> (params, params key)), unless they may be under a
    misspelled field."""
    params: dict[str, tuple[NodeParams | None, str]] = {}
    for node_id, (index, decl, entry) in declared.decls.items():
        if entry is None or node_id in declared.unchecked_params:
            continue
        value = _validate_params(entry, decl.params, f"nodes[{index}].params", problems,
                                 hints, f"node '{node_id}': ", context)
        if value is not None:
            params[node_id] = value
    return params


def _wire_connections(
    manifest: ManifestDecl, declared: _Declared, problems: list[Violation], hints: _Hints
) -> tuple[dict[str, dict[str, list[Source]]], set[tuple[str, str]]]:
    """Each connection checked and wired: node id -> input port -> its sources, and the
    (node id, output port) pairs something consumes."""
    decls, unusable = declared.decls, declared.unusable
    wiring: dict[str, dict[str, list[Source]]] = {nid: {} for nid in decls}
    consumed: set[tuple[str, str]] = set()
    for index, raw in enumerate(manifest.connections):
        prefix = f"connections[{index}]"
        conn, dropped = _validate_rest(ConnectionDecl, raw, prefix, CONNECTION_FIELDS, problems,
                                       hints)
        if conn is None:
            continue
        ok = not dropped  # a port name may be what was misspelled: check the nodes only
        for side, node_id in (("from", conn.from_), ("to", conn.to)):
            if node_id in unusable:
                ok = False
            elif node_id not in decls:
                problems.append(Violation(f"{prefix}.{side}", f"no node '{clip(node_id)}'"
                                                              f"{hints(node_id, list(decls))}"))
                ok = False
        if not ok:
            continue
        src_entry, dst_entry = decls[conn.from_][2], decls[conn.to][2]
        if src_entry is None or dst_entry is None:
            continue  # unknown type already reported
        src_port = _resolve_port(src_entry.outputs, conn.from_port, conn.from_, "output",
                                 f"{prefix}.from_port", problems)
        dst_port = _resolve_port(dst_entry.inputs, conn.to_port, conn.to, "input",
                                 f"{prefix}.to_port", problems)
        if src_port is None or dst_port is None:
            continue
        sources = wiring[conn.to].setdefault(dst_port.name, [])
        if sources and not dst_port.many:
            problems.append(Violation(
                prefix, f"input port '{dst_port.name}' of node '{conn.to}' is already fed by "
                        f"'{sources[0].node_id}' and accepts one connection"))
            continue
        sources.append(Source(conn.from_, src_port.name))
        consumed.add((conn.from_, src_port.name))
    return wiring, consumed


def _check_cycles(wiring: Mapping[str, Mapping[str, list[Source]]],
                  problems: list[Violation]) -> None:
    cycle = _find_cycle({nid: [s.node_id for srcs in ports.values() for s in srcs]
                         for nid, ports in wiring.items()})
    if cycle:
        problems.append(Violation("connections", "cycle: " + " -> ".join(cycle)))


def _decide_runtimes(declared: _Declared, params: Mapping[str, tuple[NodeParams | None, str]],
                     wiring: Mapping[str, Mapping[str, list[Source]]],
                     selector: Selector) -> dict[str, NodeSpec]:
    """Each node's spec, with the selector's runtime decision (a valid manifest only)."""
    nodes: dict[str, NodeSpec] = {}
    for node_id, (_, decl, entry) in declared.decls.items():
        assert entry is not None
        node_params, params_key = params[node_id]
        nodes[node_id] = NodeSpec(
            node_id=node_id,
            entry=entry,
            params=node_params,
            params_key=params_key,
            decision=selector.decide(node_id, entry, decl.runtime_hint),
            timeout_s=decl.timeout_s or entry.traits.timeout_s,
            wiring={port: tuple(srcs) for port, srcs in wiring[node_id].items()},
        )
    return nodes


def _node_entry(registry: NodeRegistry, decl: NodeDecl, field: str, problems: list[Violation],
                hints: _Hints) -> NodeEntry | None:
    """The registered entry of ``decl``'s node type, or None with the problem recorded (the
    registry's message, with its suggestion, while the hint budget lasts)."""
    if decl.node_type in registry:
        return registry.get(decl.node_type)
    if decl.node_type in registry.optional:
        # Known, but its optional dependency is not installed here: what to install, as a
        # precondition of this server (FAILED_PRECONDITION), not a typo in the request.
        problems.append(Violation(field, f"node '{decl.id}': " + needs_message(
            decl.node_type, registry.optional[decl.node_type]), kind="precondition"))
        return None
    if registry.refused:
        # Maybe a node of an untrusted module the sandbox policy refused: say so, as a
        # precondition of this server rather than a mistake in the request.
        problems.append(Violation(field, f"node '{decl.id}': unknown node type "
                                         f"'{clip(decl.node_type)}'; "
                                         + "; ".join(registry.unavailable[m]
                                                     for m in sorted(registry.refused)),
                                  kind="precondition"))
        return None
    if hints.available(decl.node_type, len(registry)):
        try:
            registry.get(decl.node_type)
        except UnknownNodeType as exc:
            problems.append(Violation(field, f"node '{decl.id}': {exc.message}"))
    else:
        problems.append(Violation(field, f"node '{decl.id}': unknown node type "
                                         f"'{clip(decl.node_type)}'"))
    return None


def _resolve_port(ports: Sequence[Port], name: str | None, node_id: str, side: str,
                  field: str, problems: list[Violation]) -> Port | None:
    names = [p.name for p in ports]
    if name is None:
        if len(ports) == 1:
            return ports[0]
        problems.append(Violation(field, f"node '{node_id}' has {len(ports)} {side} ports "
                                         f"({', '.join(names) or 'none'}); name one"))
        return None
    for port in ports:
        if port.name == name:
            return port
    problems.append(Violation(field, f"node '{node_id}' has no {side} port '{name}' "
                                     f"({side} ports: {', '.join(names) or 'none'})"))
    return None


def _find_cycle(deps: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A cycle in the dependency graph as a path in data-flow order (first node repeated at
    the end), or None. Iterative: a manifest may chain more nodes than Python's recursion
    limit allows frames."""
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    for root in deps:
        if root in state:
            continue
        state[root] = 1
        path = [root]
        pending = [iter(deps.get(root, ()))]
        while pending:
            dep = next(pending[-1], None)
            if dep is None:
                state[path.pop()] = 2
                pending.pop()
            elif state.get(dep) == 1:
                return list(reversed([*path[path.index(dep):], dep]))
            elif dep not in state:
                state[dep] = 1
                path.append(dep)
                pending.append(iter(deps.get(dep, ())))
    return None


def _topological_order(nodes: dict[str, NodeSpec]) -> list[str]:
    """Every node after the nodes it depends on, in manifest order otherwise (iterative, like
    ``_find_cycle``; the graph is known to be acyclic here)."""
    order: list[str] = []
    done: set[str] = set()
    for root in nodes:
        if root in done:
            continue
        done.add(root)
        stack = [(root, iter([s.node_id for srcs in nodes[root].wiring.values() for s in srcs]))]
        while stack:
            node_id, sources = stack[-1]
            src = next(sources, None)
            if src is None:
                order.append(node_id)
                stack.pop()
            elif src not in done:
                done.add(src)
                stack.append((src, iter([s.node_id for srcs in nodes[src].wiring.values()
                                         for s in srcs])))
    return order


def _build_plan(manifest: ManifestDecl, nodes: dict[str, NodeSpec],
                consumed: set[tuple[str, str]]) -> ExecutionPlan:
    order = _topological_order(nodes)

    external: list[tuple[str, str]] = []
    required: set[tuple[str, str]] = set()
    sinks: list[tuple[str, str]] = []
    dependents: dict[str, list[str]] = {nid: [] for nid in nodes}
    for node_id in order:
        spec = nodes[node_id]
        for port in spec.entry.inputs:
            if port.name in spec.wiring:
                for src in spec.wiring[port.name]:
                    if node_id not in dependents[src.node_id]:
                        dependents[src.node_id].append(node_id)
            else:
                external.append((node_id, port.name))
                if port.required:
                    required.add((node_id, port.name))
        for port in spec.entry.outputs:
            if (node_id, port.name) not in consumed:
                sinks.append((node_id, port.name))
    return ExecutionPlan(
        name=str(manifest.metadata.get("name", "")),
        nodes=nodes,
        order=tuple(order),
        external_inputs=tuple(external),
        required_inputs=frozenset(required),
        sinks=tuple(sinks),
        dependents={k: tuple(v) for k, v in dependents.items()},
        metadata=dict(manifest.metadata),
        request_ports=request_ports(nodes, external),
    )


def request_ports(nodes: dict[str, NodeSpec],
                  external: list[tuple[str, str]]) -> dict[tuple[str, str], Port]:
    """Every way a request may address an external input port: (node, port), and (node, "")
    for a node with one port it defaults to (``default_port``)."""
    ports: dict[tuple[str, str], Port] = {}
    per_node: dict[str, list[Port]] = {}
    for node_id, name in external:
        port = nodes[node_id].input_ports[name]
        ports[(node_id, name)] = port
        per_node.setdefault(node_id, []).append(port)
    for node_id, external_ports in per_node.items():
        default = default_port(external_ports)
        if default is not None:
            ports[(node_id, "")] = default
    return ports
