"""What a session's outbox carries besides results: events, the opening and the closing message."""

from __future__ import annotations

from dataclasses import dataclass

from tensorline.server.executor._executor import NodeReport


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """Status or progress, never data (model loading, unjoined inputs...)."""

    node_id: str
    kind: str
    message: str = ""
    progress: float = 0.0


@dataclass(frozen=True, slots=True)
class SessionReady:
    session_id: str
    reports: list[NodeReport]


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """The final message of a session that closed normally."""

    reports: list[NodeReport]
    total_ms: float
    chunks_received: int
    results_sent: int
    max_buffered_items: int
    max_buffered_bytes: int

