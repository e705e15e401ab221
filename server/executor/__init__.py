"""Executing compiled plans: the asyncio DAG executor, the streaming executor (StreamPipeline
sessions) and the engine that owns them."""

from tensorline.server.executor._channels import Channel, size_of
from tensorline.server.executor._engine import PipelineEngine, PlanLookup
from tensorline.server.executor._events import SessionClosed, SessionEvent, SessionReady
from tensorline.server.executor._executor import (
    ExecutionResult,
    Executor,
    NodeReport,
    normalize_outputs,
)
from tensorline.server.executor._session import StreamingExecutor, StreamSession
from tensorline.wire import StreamItem

__all__ = [
    "Channel",
    "ExecutionResult",
    "Executor",
    "NodeReport",
    "PipelineEngine",
    "PlanLookup",
    "SessionClosed",
    "SessionEvent",
    "SessionReady",
    "StreamItem",
    "StreamSession",
    "StreamingExecutor",
    "normalize_outputs",
    "size_of",
]
