"""Waiting for a real condition in async tests (never a fixed sleep)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def eventually(condition: Callable[[], bool], within: float = 10.0,
                     what: str = "condition") -> None:
    """Poll ``condition`` while the event loop keeps running, until it holds or ``within``
    seconds pass (then fail naming ``what``)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not condition():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
