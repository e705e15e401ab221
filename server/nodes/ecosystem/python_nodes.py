"""A pure-Python CPU-bound node: it holds the GIL for its whole run, which is what the GIL
contention benchmark and the ``cpu_bound`` selector rule are about."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import Field

from tensorline.server.nodes._node import Node, NodeParams, NodeTraits, Port

TENSORLINE_REQUIRES: tuple[str, ...] = ()

MASK64 = (1 << 64) - 1
# How often the loop looks at the cancellation flag: rare enough to cost nothing measurable,
# frequent enough (~10 ms) that an abandoned call stops promptly.
CHECK_EVERY = 1 << 16


class PyHashChainParams(NodeParams):
    iterations: int = Field(1_000_000, ge=0, le=10**10, description="xorshift64 steps")


def hash_chain(seed: int, iterations: int) -> int:
    """``iterations`` steps of xorshift64 (13, 7, 17) from ``seed`` (0 is mapped to 1, the only
    fixed point). Plain Python ints on purpose: every step runs bytecode under the GIL."""
    x = (seed & MASK64) or 1
    for _ in range(iterations):
        x ^= (x << 13) & MASK64
        x ^= x >> 7
        x ^= (x << 17) & MASK64
    return x


class PyHashChain(Node):
    """Run a pure-Python xorshift64 chain seeded from the input tensor's bytes (CRC-32).

    Output: a uint64 tensor of shape (1,). Deterministic; the work is ``iterations`` loop steps
    of interpreted Python, so it holds the GIL the whole time (about 0.1 us per step here).
    """

    Params = PyHashChainParams
    params: PyHashChainParams
    inputs = (Port("in", kind="tensor", description="any tensor; its bytes seed the chain"),)
    outputs = (Port("out", kind="tensor", description="uint64, shape (1,)"),)
    traits = NodeTraits(cpu_bound=True)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        array = np.ascontiguousarray(inputs["in"])
        x = zlib.crc32(array.reshape(-1).view(np.uint8).data) if array.size else 0
        remaining = self.params.iterations
        cancelled = self.context.cancelled
        while remaining > 0:
            step = min(remaining, CHECK_EVERY)
            x = hash_chain(x, step)
            remaining -= step
            if cancelled.is_set():
                raise TimeoutError("PyHashChain abandoned (deadline or cancel)")
        return np.array([x], dtype=np.uint64)


TENSORLINE_NODES = (PyHashChain,)
