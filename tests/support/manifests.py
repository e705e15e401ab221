"""Manifests the tests build again and again."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def one_node(node_type: str, params: Mapping[str, Any] | None = None,
             runtime_hint: str | None = None, *, node_id: str = "n") -> dict[str, Any]:
    """A pipeline of the single node ``node_id`` (its input and output are ``node_id`` too)."""
    node: dict[str, Any] = {"id": node_id, "node_type": node_type, "params": dict(params or {})}
    if runtime_hint is not None:
        node["runtime_hint"] = runtime_hint
    return {"nodes": [node]}
