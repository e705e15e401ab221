"""Sync nodes for bench_inline.py, loaded by its servers as ``TENSORLINE_NODE_MODULES=_pace_nodes``
(the benchmark puts this folder on their ``PYTHONPATH``)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from typing import Any

from pydantic import Field

from tensorline.server.nodes import Node, NodeParams, NodeTraits


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


class ScaleParams(NodeParams):
    factor: float = Field(2.0, description="multiplier")


class BenchScale(Node):
    """Sync; multiplies by ``factor`` (the built-in Scale's float path): the runtime measures it
    and runs it inline once it proved short."""

    Params = ScaleParams
    params: ScaleParams

    def process(self, inputs: Mapping[str, Any]) -> Any:
        array = inputs["in"]
        return array * array.dtype.type(self.params.factor)


class BenchScalePooled(BenchScale):
    """BenchScale declared blocking: always in a thread (the behaviour before inline calls)."""

    traits = NodeTraits(blocking=True)
