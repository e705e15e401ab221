"""Test-only nodes for servers run as subprocesses.

Loaded with ``TENSORLINE_NODE_MODULES=tests.support.nodes`` and the repository root on PYTHONPATH
(``processes.ServerProcess.start(pythonpath_repo=True)`` does that).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from tensorline.server.nodes import Node, NodeParams, Port


class SleepParams(NodeParams):
    ms: float = Field(100.0, ge=0, le=60_000, description="how long to hold the call")
    started_marker: str | None = Field(
        None, description="file created when process() starts: lets a test see the call is "
                          "in flight before it signals the server")


class Sleep(Node):
    """Waits ``ms`` milliseconds, then returns its input unchanged: a call that stays in flight
    long enough to be caught by a drain."""

    Params = SleepParams
    inputs = (Port("in", description="any value"),)
    outputs = (Port("out", description="the same value"),)

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        assert isinstance(self.params, SleepParams)
        if self.params.started_marker:
            await asyncio.to_thread(Path(self.params.started_marker).touch)
        await asyncio.sleep(self.params.ms / 1000.0)
        return inputs["in"]
