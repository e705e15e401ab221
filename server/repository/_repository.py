"""Loading a directory of manifests into named pipelines, and looking them up by name."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tensorline.server._errors import PipelineNotFound, TensorlineServerError, clip
from tensorline.server.executor import PipelineEngine
from tensorline.server.manifest import ExecutionPlan
from tensorline.server.repository._model import LoadedPipeline, PipelinePort, PipelineState
from tensorline.wire import load_yaml

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def _ports(plan: ExecutionPlan, pairs: tuple[tuple[str, str], ...],
           side: str) -> tuple[PipelinePort, ...]:
    per_node: dict[str, int] = {}
    for node_id, _ in pairs:
        per_node[node_id] = per_node.get(node_id, 0) + 1
    ports = []
    for node_id, port in pairs:
        spec = plan.nodes[node_id]
        declared = (spec.input_ports if side == "input" else spec.output_ports)[port]
        name = node_id if per_node[node_id] == 1 else f"{node_id}.{port}"
        required = (node_id, port) in plan.required_inputs if side == "input" else True
        ports.append(PipelinePort(name, node_id, port, declared.kind, required))
    return tuple(ports)


def _read_manifest(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else load_yaml(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: a manifest must be a mapping, got {type(data).__name__}")
    return data


class PipelineRepository:
    """Named pipelines compiled from the manifests in ``directory`` (not recursive)."""

    def __init__(self, engine: PipelineEngine, directory: Path) -> None:
        self.engine = engine
        self.directory = directory
        self._loaded: dict[str, dict[int, LoadedPipeline]] = {}
        self._states: dict[str, PipelineState] = {}

    async def start(self) -> None:
        for path in sorted(self.directory.iterdir()):
            if path.is_file() and path.suffix in MANIFEST_SUFFIXES:
                self._load_file(path)

    async def close(self) -> None:
        self._loaded.clear()

    def _load_file(self, path: Path) -> None:
        name = path.stem
        try:
            data = _read_manifest(path)
            metadata = data.get("metadata")
            if isinstance(metadata, dict) and isinstance(metadata.get("name"), str):
                name = metadata["name"]
            plan = self.engine.compile(data)
        except (OSError, ValueError, TensorlineServerError) as exc:
            why = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            log.error("pipeline %s (%s) NOT loaded: %s", clip(name, 80), path, why)
            self._states[name] = PipelineState(name, "UNAVAILABLE", reason=why, source=path)
            return
        version = 1
        loaded = LoadedPipeline(name, version, plan, _ports(plan, plan.external_inputs, "input"),
                                _ports(plan, plan.sinks, "output"), path)
        self._loaded[name] = {version: loaded}
        self._states[name] = PipelineState(name, "READY", (version,), source=path)
        log.info("pipeline %s version %d loaded from %s", clip(name, 80), version, path)

    def get(self, name: str, version: int | None = None) -> LoadedPipeline:
        """The named pipeline (its newest version when ``version`` is None); PipelineNotFound
        (NOT_FOUND) names what is missing, and why when the name failed to load."""
        versions = self._loaded.get(name)
        if not versions:
            state = self._states.get(name)
            why = f": {state.reason}" if state is not None and state.reason else ""
            raise PipelineNotFound(f"no pipeline named {clip(name)!r} is ready{why}")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise PipelineNotFound(f"pipeline {clip(name)!r} has no version {version} (it has "
                                   f"{', '.join(map(str, sorted(versions)))})")
        return versions[version]

    def states(self) -> list[PipelineState]:
        """Every name the repository knows, ready or not, by name."""
        return [self._states[name] for name in sorted(self._states)]
