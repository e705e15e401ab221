"""Runtimes execute node instances: in-process (lowest latency) or in sandboxed workers.

They never decide where a node runs; ``tensorline.server.selector`` does.
"""

from tensorline.server.runtime._base import (
    BatchOutcome,
    ExecutionScope,
    LayerStatus,
    NodeInstance,
    Runtime,
)
from tensorline.server.runtime._inprocess import (
    NODE_THREAD_PREFIX,
    InProcessInstance,
    InProcessRuntime,
    node_failed,
)
from tensorline.server.runtime.sandbox import (
    ModuleUnavailable,
    SandboxInstance,
    SandboxRuntime,
    WorkerFailure,
)

__all__ = [
    "NODE_THREAD_PREFIX",
    "BatchOutcome",
    "ExecutionScope",
    "InProcessInstance",
    "InProcessRuntime",
    "LayerStatus",
    "ModuleUnavailable",
    "NodeInstance",
    "Runtime",
    "SandboxInstance",
    "SandboxRuntime",
    "WorkerFailure",
    "node_failed",
]
