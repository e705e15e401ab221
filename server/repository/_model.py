"""What the repository holds for each named pipeline: its compiled plan and its signature."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tensorline.server.manifest import ExecutionPlan

State = Literal["READY", "LOADING", "UNAVAILABLE"]


@dataclass(frozen=True, slots=True)
class PipelinePort:
    """One input (a request-fed port) or output (a sink) of a named pipeline.

    ``name`` is what clients address it by: the node id when that node has a single such port,
    else ``node.port``. ``datatype`` (a KServe v2 name such as ``FP32``) and ``shape`` (-1 for
    a free dimension) are declared by the manifest where it knows them, else None."""

    name: str
    node_id: str
    port: str
    kind: str
    required: bool = True
    datatype: str | None = None
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class LoadedPipeline:
    """One version of a named pipeline, compiled and ready to run."""

    name: str
    version: int
    plan: ExecutionPlan
    inputs: tuple[PipelinePort, ...]
    outputs: tuple[PipelinePort, ...]
    source: Path | None = None
    # ``inputs`` by name: what every inference request looks its tensors up in.
    inputs_by_name: Mapping[str, PipelinePort] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs_by_name", {port.name: port for port in self.inputs})


@dataclass(frozen=True, slots=True)
class PipelineState:
    """What the repository reports of a name: ready (with its versions), or why not."""

    name: str
    state: State
    versions: tuple[int, ...] = ()
    reason: str = ""
    source: Path | None = None
