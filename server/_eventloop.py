"""Running the server's top-level coroutine on the configured event loop.

uvloop (libuv) runs each loop iteration and callback in C: on a 1 KiB unary call, most of the
server's time is gRPC's own machinery driven through the loop, so the loop's cost shows up
directly in CPU per call (bench/bench_unary.py reports both loops). gRPC's asyncio stack works
with any asyncio loop: its poller thread wakes the loop through a socket the loop watches.

``auto`` uses uvloop when it is importable and the standard loop otherwise (e.g. platforms
without a uvloop wheel), so a missing optional speed-up never stops the server.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

LoopChoice = Literal["auto", "uvloop", "asyncio"]


def resolve(choice: LoopChoice) -> Literal["uvloop", "asyncio"]:
    """The loop ``choice`` stands for on this machine; ``uvloop`` when it cannot be imported
    raises ``RuntimeError`` naming the setting."""
    available = importlib.util.find_spec("uvloop") is not None
    if choice == "asyncio" or (choice == "auto" and not available):
        return "asyncio"
    if not available:
        raise RuntimeError("event_loop=uvloop but uvloop is not installed "
                           "(pip install uvloop, or set TENSORLINE_EVENT_LOOP=asyncio)")
    return "uvloop"


def run(main: Coroutine[Any, Any, T], choice: LoopChoice = "auto") -> T:
    """``asyncio.run(main)`` on the loop ``choice`` resolves to."""
    if resolve(choice) == "uvloop":
        import uvloop

        log.debug("event loop: uvloop")
        return uvloop.run(main)
    log.debug("event loop: asyncio")
    return asyncio.run(main)
