"""A named pipeline's signature: the inputs and outputs clients see, with the names, datatypes
and shapes its manifest declares (``metadata.inputs`` / ``metadata.outputs``).

A declaration is ``{name, node, port?, datatype?, shape?}``; it names one request-fed input port
(or one sink) of the plan and gives it a client-facing name and, optionally, a KServe v2
datatype and shape (-1 = free dimension). Ports not declared keep their default name (the node
id when that node has a single such port, else ``node.port``). Every problem is collected with
its field path (``metadata.inputs[0].node``) and raised at once as ``RequestInvalid``.
"""

from __future__ import annotations

from typing import Any

from tensorline.server._errors import RequestInvalid, clip
from tensorline.server.manifest import ExecutionPlan
from tensorline.server.repository._model import PipelinePort
from tensorline.wire import Violation

# KServe v2 (Open Inference Protocol) tensor datatypes.
DATATYPES = frozenset({"BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32",
                       "UINT64", "FP16", "FP32", "FP64", "BYTES"})
_KEYS = ("name", "node", "port", "datatype", "shape")
# Dimensions a declared shape may have (numpy's own limit).
MAX_DIMS = 32


def _default_ports(plan: ExecutionPlan, pairs: tuple[tuple[str, str], ...],
                   side: str) -> list[PipelinePort]:
    per_node: dict[str, int] = {}
    for node_id, _ in pairs:
        per_node[node_id] = per_node.get(node_id, 0) + 1
    ports = []
    for node_id, port in pairs:
        spec = plan.nodes[node_id]
        declared = (spec.input_ports if side == "inputs" else spec.output_ports)[port]
        name = node_id if per_node[node_id] == 1 else f"{node_id}.{port}"
        required = (node_id, port) in plan.required_inputs if side == "inputs" else True
        ports.append(PipelinePort(name, node_id, port, declared.kind, required))
    return ports


def _shape(value: Any, path: str, problems: list[Violation]) -> tuple[int, ...] | None:
    if not isinstance(value, list) or len(value) > MAX_DIMS or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in value):
        problems.append(Violation(path, f"must be a list of at most {MAX_DIMS} integers, each "
                                        ">= 0 or -1 for a free dimension"))
        return None
    return tuple(value)


def _declare(ports: list[PipelinePort], declarations: Any, side: str,
             problems: list[Violation]) -> list[PipelinePort]:
    """``ports`` with the declarations of ``metadata.<side>`` applied."""
    base = f"metadata.{side}"
    if declarations is None:
        return ports
    if not isinstance(declarations, list):
        problems.append(Violation(base, "must be a list of {name, node, port?, datatype?, "
                                        "shape?}"))
        return ports
    by_pair = {(p.node_id, p.port): i for i, p in enumerate(ports)}
    result = list(ports)
    declared: dict[int, str] = {}
    for index, item in enumerate(declarations):
        path = f"{base}[{index}]"
        if not isinstance(item, dict):
            problems.append(Violation(path, "must be a mapping {name, node, port?, datatype?, "
                                            "shape?}"))
            continue
        for key in item:
            if key not in _KEYS:
                problems.append(Violation(f"{path}.{clip(key, 40)}",
                                          f"unknown field (allowed: {', '.join(_KEYS)})"))
        name, node, port = item.get("name"), item.get("node"), item.get("port")
        if not isinstance(name, str) or not name:
            problems.append(Violation(f"{path}.name", "must be a non-empty string"))
        if not isinstance(node, str) or not node:
            problems.append(Violation(f"{path}.node", "must be a node id"))
            continue
        if port is not None and not isinstance(port, str):
            problems.append(Violation(f"{path}.port", "must be a port name"))
            continue
        candidates = [pair for pair in by_pair if pair[0] == node
                      and (port is None or pair[1] == port)]
        what = "request-fed input" if side == "inputs" else "output (a sink)"
        if not candidates:
            known = sorted({pair[0] for pair in by_pair})
            field = f"{path}.node" if port is None or not any(
                pair[0] == node for pair in by_pair) else f"{path}.port"
            problems.append(Violation(field, f"{clip(node, 80)}{'.' + clip(port, 40) if port else ''}"
                                             f" is no {what} of this pipeline (its {side}: "
                                             f"{', '.join(known) or 'none'})"))
            continue
        if len(candidates) > 1:
            problems.append(Violation(f"{path}.port", f"node {clip(node, 80)} has several "
                                                      f"{side} ({', '.join(p for _, p in candidates)})"
                                                      ": name the port"))
            continue
        slot = by_pair[candidates[0]]
        if slot in declared:
            problems.append(Violation(path, f"declares {node}.{candidates[0][1]} again (already "
                                            f"{declared[slot]})"))
            continue
        declared[slot] = path
        datatype = item.get("datatype")
        if datatype is not None and datatype not in DATATYPES:
            problems.append(Violation(f"{path}.datatype", f"{clip(datatype, 40)!r} is no KServe "
                                                          f"v2 datatype ({', '.join(sorted(DATATYPES))})"))
            datatype = None
        shape = item.get("shape")
        shape = None if shape is None else _shape(shape, f"{path}.shape", problems)
        old = result[slot]
        result[slot] = PipelinePort(name if isinstance(name, str) and name else old.name,
                                    old.node_id, old.port, old.kind, old.required, datatype,
                                    shape)
    seen: dict[str, int] = {}
    for index, port_ in enumerate(result):
        if port_.name in seen:
            problems.append(Violation(base, f"two {side} are named {clip(port_.name, 80)!r} "
                                            f"({result[seen[port_.name]].node_id}."
                                            f"{result[seen[port_.name]].port} and "
                                            f"{port_.node_id}.{port_.port})"))
        seen.setdefault(port_.name, index)
    return result


def signature(plan: ExecutionPlan) -> tuple[tuple[PipelinePort, ...], tuple[PipelinePort, ...]]:
    """The pipeline's (inputs, outputs); ``RequestInvalid`` naming every bad declaration."""
    problems: list[Violation] = []
    metadata = plan.metadata
    inputs = _declare(_default_ports(plan, plan.external_inputs, "inputs"),
                      metadata.get("inputs"), "inputs", problems)
    outputs = _declare(_default_ports(plan, plan.sinks, "outputs"), metadata.get("outputs"),
                       "outputs", problems)
    if problems:
        raise RequestInvalid(problems, "invalid pipeline signature")
    return tuple(inputs), tuple(outputs)
