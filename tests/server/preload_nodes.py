"""Test-only nodes for preloading and warm-up (tests/server/test_preload.py,
tests/server/service/test_warmup.py).

Loaded with ``TENSORLINE_NODE_MODULES=tests.server.preload_nodes`` (and imported by name in
sandbox workers), so it imports nothing but the node SDK, numpy and the stdlib, and in
particular never ``tests.server.preload_probe``: that module's presence must come from
preloading alone.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from tensorline.server.nodes import Json, Node, NodeTraits, Port, WarmUp

# The test modules only preloading imports.
PROBES = ("tests.server.preload_needs_env", "tests.server.preload_probe")

_EXAMPLE = WarmUp({"in": np.zeros(1, dtype=np.float32)})


class PreloadedModules(Node):
    """Which of PROBES this process has imported, and its pid."""

    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("out", kind="json"),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return Json({"modules": [m for m in PROBES if m in sys.modules],
                     "pid": os.getpid()})


class _Counted(Node):
    """Counts its process() calls in this process: the warm-up's call leaves 1 behind."""

    calls: ClassVar[int] = 0
    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("out", kind="json"),)
    warmup = (_EXAMPLE,)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        type(self).calls += 1
        return Json({"calls": type(self).calls, "pid": os.getpid()})


class WarmCounted(_Counted):
    """Counts its calls, in the server process."""

    calls = 0
    traits = NodeTraits(isolation="inprocess")


class WarmCountedSandboxed(_Counted):
    """Counts its calls, in the sandbox worker that runs it."""

    calls = 0
    traits = NodeTraits(isolation="sandbox")


class WarmFails(Node):
    """Declares a warm-up example it fails on (an empty tensor); serves any other input."""

    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("out", kind="tensor"),)
    warmup = (WarmUp({"in": np.zeros(0, dtype=np.float32)}),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        if inputs["in"].size == 0:
            raise ValueError("warm-up boom: an empty tensor")
        return inputs["in"]


class WarmHangs(Node):
    """Declares a warm-up example that never finishes (until cancelled)."""

    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("out", kind="tensor"),)
    traits = NodeTraits(isolation="inprocess")
    warmup = (_EXAMPLE,)

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        await asyncio.Event().wait()
