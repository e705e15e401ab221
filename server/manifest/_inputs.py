"""Binding request inputs to a plan's external input ports, with every problem reported."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tensorline.server._errors import RequestInvalid, Violation
from tensorline.server.manifest._plan import ExecutionPlan
from tensorline.server.nodes import Port
from tensorline.wire import PortItem, Tagged, kind_of

BoundInputs = dict[tuple[str, str], Any]


def port_accepts(port: Port, value: Any) -> bool:
    return port.kind == "any" or kind_of(value) == port.kind


def value_for_port(port: Port, value: Any) -> Any:
    """What a node receives on ``port``: the value as sent (metadata included) on an "any" port,
    the bare value (without its ``Tagged`` metadata) on a typed port."""
    if port.kind != "any" and isinstance(value, Tagged):
        return value.value
    return value


def default_port(external: Sequence[Port]) -> Port | None:
    """The port a request input naming only the node binds to: the node's only unconnected
    input, else its only unconnected *required* one (an optional port need not be named when
    the required one is obvious); None when that is ambiguous."""
    if len(external) == 1:
        return external[0]
    required = [p for p in external if p.required]
    return required[0] if len(required) == 1 else None


def resolve_input_port(plan: ExecutionPlan, node_id: str, port_name: str,
                       field: str) -> tuple[Port | None, Violation | None]:
    """The external input port addressed by (node_id, port_name) or the violation explaining why
    there is none. An empty port name means the node's only external input port."""
    spec = plan.nodes.get(node_id)
    if spec is None:
        return None, Violation(f"{field}.node_id",
                               f"no node '{node_id}' in the manifest (nodes: {', '.join(plan.nodes)})")
    external = [p for p in spec.entry.inputs if p.name not in spec.wiring]
    if not port_name:
        default = default_port(external)
        if default is not None:
            return default, None
        if not external and spec.wiring:
            fed = ", ".join(f"'{name}' by node '{srcs[0].node_id}'"
                            for name, srcs in spec.wiring.items())
            return None, Violation(field, f"node '{node_id}' takes no input from the request: "
                                          f"its input ports are fed by other nodes ({fed})")
        names = ", ".join(p.name + ("" if p.required else " (optional)")
                          for p in external) or "none"
        example = f" (e.g. '{node_id}:{external[0].name}')" if external else ""
        return None, Violation(f"{field}.port", f"node '{node_id}' has {len(external)} inputs "
                                                f"fed by the request ({names}); name the port"
                                                f"{example}")
    port = spec.input_ports.get(port_name)
    if port is None:
        names = ", ".join(spec.input_ports) or "none"
        return None, Violation(f"{field}.port",
                               f"node '{node_id}' has no input port '{port_name}' (inputs: {names})")
    if port_name in spec.wiring:
        src = spec.wiring[port_name][0]
        return None, Violation(field, f"input port '{port_name}' of node '{node_id}' is fed by "
                                      f"node '{src.node_id}', not by the request")
    return port, None


def check_value_kind(port: Port, node_id: str, value: Any, field: str) -> Violation | None:
    if port_accepts(port, value):
        return None
    return Violation(f"{field}.value", f"node '{node_id}' port '{port.name}' takes {port.kind}, "
                                       f"got {kind_of(value)}")


def bind_inputs(plan: ExecutionPlan, items: Sequence[PortItem],
                prior: Sequence[Violation] = ()) -> BoundInputs:
    """Map request inputs to (node, port). Raises RequestInvalid listing every problem, including
    the codec's ``prior`` ones (bad tensor bytes etc.)."""
    if not prior:
        bound = _bind_well_formed(plan, items)
        if bound is not None:
            return bound
    return _bind_reporting(plan, items, prior)


def _bind_well_formed(plan: ExecutionPlan, items: Sequence[PortItem]) -> BoundInputs | None:
    """The binding of a request with nothing wrong and no ``many`` port, or None as soon as
    anything needs a closer look (``_bind_reporting`` then finds and explains it)."""
    bound: BoundInputs = {}
    ports = plan.request_ports
    for item in items:
        port = ports.get((item.node_id, item.port))
        value = item.value
        if port is None or port.many or value is None:
            return None
        if port.kind != "any" and (type(value) is Tagged or kind_of(value) != port.kind):
            return None
        key = (item.node_id, port.name)
        if key in bound:
            return None
        bound[key] = value
    return bound if plan.required_inputs.issubset(bound) else None


def _bind_reporting(plan: ExecutionPlan, items: Sequence[PortItem],
                    prior: Sequence[Violation]) -> BoundInputs:
    problems = list(prior)
    bound: BoundInputs = {}
    # Ports whose value the codec could not decode (already reported): not "missing" as well.
    undecodable: set[tuple[str, str]] = set()
    # Nodes given a value whose port could not be resolved (already reported): their inputs
    # were supplied, only misaddressed, so none of them is "missing" as well.
    misaddressed: set[str] = set()
    for index, item in enumerate(items):
        field = f"inputs[{index}]"
        port, problem = resolve_input_port(plan, item.node_id, item.port, field)
        if port is None:
            assert problem is not None
            problems.append(problem)
            misaddressed.add(item.node_id)
            continue
        if item.value is None:
            undecodable.add((item.node_id, port.name))
            continue
        value = value_for_port(port, item.value)
        problem = check_value_kind(port, item.node_id, value, field)
        if problem:
            problems.append(problem)
            continue
        key = (item.node_id, port.name)
        if port.many:
            bound.setdefault(key, []).append(value)
        elif key in bound:
            problems.append(Violation(field, f"a second value for node '{item.node_id}' "
                                             f"port '{port.name}'"))
        else:
            bound[key] = value
    present = set(bound) | undecodable
    for node_id, port_name in plan.external_inputs:
        if ((node_id, port_name) in plan.required_inputs and (node_id, port_name) not in present
                and node_id not in misaddressed):
            problems.append(Violation("inputs", f"missing input for node '{node_id}' "
                                                f"port '{port_name}'"))
    if problems:
        limit_only = all(v.kind == "limit" for v in problems)
        raise RequestInvalid(problems, "request exceeds limits" if limit_only else "invalid inputs")
    return bound
