"""Hostile at import, for the untrusted-catalogue tests: the module's top-level code records
the process and environment it runs in, and its Params validator reports its pid for a magic
value. Loaded with ``--untrusted-module``, none of this may ever run in the server: the server
must learn the catalogue from a sandboxed worker and check params against the exported schema.

What the top level recorded comes back through an ordinary node output (``ImportProbe``),
which no sandbox layer blocks, so a test can tell where the import happened.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import field_validator

from tensorline.server.nodes import Json, Node, NodeParams, NodeTraits, Port

IMPORTED_IN_PID = os.getpid()
IMPORT_TMPDIR = os.environ.get("TMPDIR", "")
IMPORT_ENV_KEYS = sorted(os.environ)

# The params value whose validation reports the validating process.
MAGIC = "reveal-pid"


class ProbeParams(NodeParams):
    mode: str = "plain"
    gain: float = 1.0

    @field_validator("mode")
    @classmethod
    def _reveal(cls, mode: str) -> str:
        if mode == MAGIC:
            raise ValueError(f"validated in pid {os.getpid()}")
        return mode


class ImportProbe(Node):
    """Reports the process and environment its module was imported in."""

    Params = ProbeParams
    inputs = (Port("in", kind="tensor", description="anything"),)
    outputs = (Port("out", kind="json", description="where the import ran"),)
    traits = NodeTraits(timeout_s=30.0)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return Json({"pid": IMPORTED_IN_PID, "tmpdir": IMPORT_TMPDIR,
                     "env_keys": IMPORT_ENV_KEYS, "gain": self.params.gain})


class ProbeWarm(Node):
    """A reusable node with initialize and cleanup (flags the runtime needs)."""

    inputs = (Port("left", kind="tensor"), Port("right", kind="tensor", required=False))
    outputs = (Port("sum", kind="tensor"),)
    reusable = True

    async def initialize(self) -> None:
        self.offset = 1

    def process(self, inputs: Mapping[str, Any]) -> Any:
        right = inputs.get("right")
        return inputs["left"] + (0 if right is None else right) + self.offset

    def cleanup(self) -> None:
        self.offset = 0
