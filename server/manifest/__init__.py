"""Pipeline manifests: the model, validation and compilation into cached execution plans."""

from tensorline.server.manifest._compile import (
    ManifestLimits,
    compile_manifest,
    parse_manifest_json,
)
from tensorline.server.manifest._inputs import (
    BoundInputs,
    bind_inputs,
    check_value_kind,
    port_accepts,
    resolve_input_port,
    value_for_port,
)
from tensorline.server.manifest._model import ConnectionDecl, ManifestDecl, NodeDecl
from tensorline.server.manifest._plan import ExecutionPlan, NodeSpec, PlanCache, Source

__all__ = [
    "BoundInputs",
    "ConnectionDecl",
    "ExecutionPlan",
    "ManifestDecl",
    "ManifestLimits",
    "NodeDecl",
    "NodeSpec",
    "PlanCache",
    "Source",
    "bind_inputs",
    "check_value_kind",
    "compile_manifest",
    "parse_manifest_json",
    "port_accepts",
    "resolve_input_port",
    "value_for_port",
]
