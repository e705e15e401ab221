"""The pipeline manifest as pydantic models. Accepts the reference JSON shape as-is:

    {"version": "v1", "metadata": {"name": "demo"},
     "nodes": [{"id": "a", "node_type": "Scale", "params": {"factor": 2}, "runtime_hint": "auto"}],
     "connections": [{"from": "a", "to": "b"}]}

Unknown fields are errors (a typo must not pass silently). ``from_port``/``to_port`` address
ports of multi-port nodes; they may be left out where a node has a single port of that side.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class NodeDecl(_Strict):
    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    node_type: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    runtime_hint: str | None = None
    # Seconds one process() call of this node may take (overrides the node's own trait).
    timeout_s: float | None = Field(default=None, gt=0)


class ConnectionDecl(_Strict):
    from_: str = Field(alias="from", min_length=1)
    to: str = Field(min_length=1)
    from_port: str | None = None
    to_port: str | None = None


class ManifestDecl(_Strict):
    version: Literal["v1"] = "v1"
    metadata: dict[str, Any] = Field(default_factory=dict)
    nodes: list[dict[str, Any]] = Field(min_length=1)
    connections: list[dict[str, Any]] = Field(default_factory=list)


MANIFEST_FIELDS = tuple(ManifestDecl.model_fields)
NODE_FIELDS = tuple(NodeDecl.model_fields)
CONNECTION_FIELDS = ("from", "to", "from_port", "to_port")
