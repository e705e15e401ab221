"""The catalogue of an untrusted node module, made by a sandboxed worker as plain data.

The server never imports an untrusted module: importing runs its top-level code. A worker of
the module's own trust domain imports it instead and answers the ``describe`` request with
``describe_module``: one dict per node class, of str/int/float/bool/None in lists and dicts
only (all that the server's restricted unpickler rebuilds). The module's code has run in that
worker before the reply is made, so the server believes none of it: ``parse_catalogue`` checks
every entry with ``NodeDescription`` (every count and string bounded, the params schema a valid
JSON schema), drops a malformed one with a log line, and ``entry_of`` turns a valid one into a
``NodeEntry`` without a class.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tensorline.server.nodes._node import (
    Isolation,
    Node,
    NodeTraits,
    Port,
    PortKind,
    is_async,
    overrides,
)
from tensorline.server.nodes._params_schema import check_schema
from tensorline.server.nodes._registry import NodeEntry, _nodes_of

log = logging.getLogger(__name__)

# Bounds on what a (possibly hostile) module can make the server hold and log.
MAX_NODES = 256
MAX_PORTS = 64
MAX_NAME = 200
MAX_TEXT = 2000
MAX_SCHEMA = 64 * 1024
MAX_ERRORS = 32
MAX_LIBRARIES = 32

_DOTTED = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
# Node types end up in logs, metrics labels and error messages: printable names only.
_NODE_TYPE = r"^[A-Za-z0-9_.:\-]+$"


class CatalogueInvalid(ValueError):
    """The worker's reply as a whole is not a catalogue."""


# --- in the worker --------------------------------------------------------------------------

def describe_module(name: str) -> dict[str, Any]:
    """Import ``name`` (in the worker, never in the server) and describe its node classes:
    ``{"nodes": [...], "errors": [...]}``, a class that cannot be described in ``errors``."""
    classes: list[Any] = _nodes_of(importlib.import_module(name))
    nodes: list[dict[str, Any]] = []
    errors: list[str] = []
    for cls in classes[:MAX_NODES]:
        try:
            nodes.append(_describe_class(cls))
        except Exception as exc:
            errors.append(f"{getattr(cls, '__qualname__', cls)!s:.{MAX_NAME}}: "
                          f"{type(exc).__name__}: {exc!s:.{MAX_TEXT}}")
    if len(classes) > MAX_NODES:
        errors.append(f"{len(classes) - MAX_NODES} node classes past the limit of {MAX_NODES}")
    return {"nodes": nodes, "errors": errors[:MAX_ERRORS]}


def _describe_class(cls: type[Node]) -> dict[str, Any]:
    traits = cls.traits
    return {
        "node_type": str(cls.node_type),
        "description": str(cls.description)[:MAX_TEXT],
        "class_module": cls.__module__,
        "qualname": cls.__qualname__,
        "inputs": [_describe_port(p) for p in cls.inputs],
        "outputs": [_describe_port(p) for p in cls.outputs],
        "traits": {"isolation": traits.isolation, "needs_gpu": bool(traits.needs_gpu),
                   "memory_mb": traits.memory_mb, "cpu_bound": bool(traits.cpu_bound),
                   "timeout_s": None if traits.timeout_s is None else float(traits.timeout_s),
                   "libraries": [str(lib) for lib in traits.libraries],
                   "blocking": None if traits.blocking is None else bool(traits.blocking)},
        "reusable": bool(cls.reusable),
        "streaming": bool(cls.streaming),
        "async_process": is_async(cls, "process"),
        "async_initialize": is_async(cls, "initialize"),
        "async_cleanup": is_async(cls, "cleanup"),
        "has_initialize": overrides(cls, "initialize"),
        "has_cleanup": overrides(cls, "cleanup"),
        "params_schema": json.dumps(cls.Params.model_json_schema(), sort_keys=True),
    }


def _describe_port(port: Port) -> dict[str, Any]:
    return {"name": str(port.name), "kind": str(port.kind),
            "description": str(port.description)[:MAX_TEXT], "required": bool(port.required),
            "many": bool(port.many)}


# --- in the server --------------------------------------------------------------------------

_Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
_Text = Annotated[str, Field(max_length=MAX_TEXT)]
_Dotted = Annotated[str, Field(min_length=1, max_length=MAX_NAME, pattern=_DOTTED)]


class _Strict(BaseModel):
    # Strict: a worker's reply is taken as it is, never coerced into shape.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class PortDescription(_Strict):
    name: _Name
    kind: PortKind
    description: _Text
    required: bool
    many: bool

    def port(self) -> Port:
        return Port(self.name, self.kind, self.description, self.required, self.many)


class TraitsDescription(_Strict):
    isolation: Isolation
    needs_gpu: bool
    memory_mb: int | None = Field(ge=1, le=1 << 24)
    cpu_bound: bool
    timeout_s: float | None = Field(gt=0, le=365 * 86400)
    libraries: list[_Name] = Field(max_length=MAX_LIBRARIES)
    blocking: bool | None = None

    def traits(self) -> NodeTraits:
        return NodeTraits(isolation=self.isolation, needs_gpu=self.needs_gpu,
                          memory_mb=self.memory_mb, cpu_bound=self.cpu_bound,
                          timeout_s=self.timeout_s, libraries=tuple(self.libraries),
                          blocking=self.blocking)


class NodeDescription(_Strict):
    """One node class of an untrusted module, as its sandboxed worker described it."""

    node_type: Annotated[str, Field(min_length=1, max_length=MAX_NAME, pattern=_NODE_TYPE)]
    description: _Text
    class_module: _Dotted
    qualname: _Dotted
    inputs: list[PortDescription] = Field(max_length=MAX_PORTS)
    outputs: list[PortDescription] = Field(max_length=MAX_PORTS)
    traits: TraitsDescription
    reusable: bool
    streaming: bool
    async_process: bool
    async_initialize: bool
    async_cleanup: bool
    has_initialize: bool
    has_cleanup: bool
    params_schema: Annotated[str, Field(max_length=MAX_SCHEMA)]

    @field_validator("params_schema")
    @classmethod
    def _schema(cls, text: str) -> str:
        return check_schema(text)

    @field_validator("inputs", "outputs")
    @classmethod
    def _unique(cls, ports: list[PortDescription]) -> list[PortDescription]:
        names = [p.name for p in ports]
        if len(set(names)) != len(names):
            raise ValueError("port names must be unique")
        return ports


def parse_catalogue(module: str, reply: Any) -> list[NodeDescription]:
    """The valid node descriptions in a worker's ``describe`` reply for ``module``; each
    malformed one is logged and left out. CatalogueInvalid when the reply is no catalogue."""
    if (not isinstance(reply, dict) or set(reply) != {"nodes", "errors"}
            or not isinstance(reply["nodes"], list) or not isinstance(reply["errors"], list)):
        raise CatalogueInvalid("the worker's describe reply is not a catalogue")
    for error in reply["errors"][:MAX_ERRORS]:
        log.error("untrusted module %s: a node class could not be described: %r", module,
                  str(error)[:MAX_TEXT])
    if len(reply["nodes"]) > MAX_NODES:
        log.error("untrusted module %s: %d node descriptions past the limit of %d ignored",
                  module, len(reply["nodes"]) - MAX_NODES, MAX_NODES)
    found: list[NodeDescription] = []
    for index, raw in enumerate(reply["nodes"][:MAX_NODES]):
        try:
            description = NodeDescription.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            log.error("untrusted module %s: node description #%d (node type %r) rejected "
                      "(%d problem(s); first: %s: %s)", module, index, _claimed_type(raw),
                      exc.error_count(), where[:MAX_NAME], first["msg"][:MAX_TEXT])
            continue
        if not (description.class_module == module
                or description.class_module.startswith(module + ".")):
            log.error("untrusted module %s: node type %r rejected: its class lives in %s, "
                      "outside the module", module, description.node_type,
                      description.class_module)
            continue
        found.append(description)
    return found


def _claimed_type(raw: Any) -> str | None:
    """The node type a rejected description claims, for the log line (bounded)."""
    claimed = raw.get("node_type") if isinstance(raw, dict) else None
    return claimed[:MAX_NAME] if isinstance(claimed, str) else None


def entry_of(description: NodeDescription, module: str, *, memory_mb_max: int | None = None,
             timeout_s_max: float | None = None) -> NodeEntry:
    """The registry entry of an untrusted node: everything but its class. The traits that
    would widen its sandbox are the module's own say: its memory cap and its time per call are
    held to ``memory_mb_max`` and ``timeout_s_max`` (the sandbox's limits), less if it says
    less (declared, they were its worker's cap and deadline: a terabyte, a year)."""
    d = description
    traits = d.traits.traits()
    if memory_mb_max is not None and (traits.memory_mb or memory_mb_max) > memory_mb_max:
        traits = dataclasses.replace(traits, memory_mb=memory_mb_max)
    if timeout_s_max is not None and (traits.timeout_s or 0.0) > timeout_s_max:
        traits = dataclasses.replace(traits, timeout_s=timeout_s_max)
    return NodeEntry(
        node_type=d.node_type, module=module, trusted=False,
        class_ref=(d.class_module, d.qualname), description=d.description,
        inputs=tuple(p.port() for p in d.inputs), outputs=tuple(p.port() for p in d.outputs),
        traits=traits, reusable=d.reusable, streaming=d.streaming,
        async_process=d.async_process, async_initialize=d.async_initialize,
        async_cleanup=d.async_cleanup, has_initialize=d.has_initialize,
        has_cleanup=d.has_cleanup, cls=None, schema_json=d.params_schema,
    )
