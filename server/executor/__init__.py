"""Executing compiled plans: the asyncio DAG executor and the engine that owns it."""

from tensorline.server.executor._engine import PipelineEngine, PlanLookup
from tensorline.server.executor._executor import (
    ExecutionResult,
    Executor,
    NodeReport,
    normalize_outputs,
)

__all__ = [
    "ExecutionResult",
    "Executor",
    "NodeReport",
    "PipelineEngine",
    "PlanLookup",
    "normalize_outputs",
]
