"""Sync nodes for bench_inline.py, loaded by its servers as ``TENSORLINE_NODE_MODULES=_pace_nodes``
(the benchmark puts this folder on their ``PYTHONPATH``)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from typing import Any

from pydantic import Field

from tensorline.server.nodes import Node, NodeParams


class SleepParams(NodeParams):
    ms: float = Field(20.0, ge=0, description="how long every call blocks")


class BenchSleep(Node):
    """Sync; blocks (time.sleep, like waiting on I/O) for ``ms`` on every call."""

    Params = SleepParams
    params: SleepParams

    def process(self, inputs: Mapping[str, Any]) -> Any:
        time.sleep(self.params.ms / 1000)
        return inputs["in"]


class SometimesParams(NodeParams):
    every: int = Field(500, ge=1, description="one call in this many blocks")
    ms: float = Field(50.0, ge=0, description="for this long")


# Calls of BenchSometimes in this server process (all instances: one is made per call).
_CALLS = itertools.count(1)


class BenchSometimes(Node):
    """Sync; returns at once, except one call in ``every``, which blocks for ``ms``: a fast node
    that now and then waits on something."""

    Params = SometimesParams
    params: SometimesParams

    def process(self, inputs: Mapping[str, Any]) -> Any:
        if next(_CALLS) % self.params.every == 0:
            time.sleep(self.params.ms / 1000)
        return inputs["in"]
