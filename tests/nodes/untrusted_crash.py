"""An untrusted node module whose import kills its process, but only inside a sandbox worker:
imported anywhere else by mistake it must not take the test runner down with it."""

from __future__ import annotations

import os

from tensorline.server.nodes import Node


class NeverListedEither(Node):
    """Would be listed if the module imported."""


# A sandbox worker's TMPDIR is its scratch dir, below the pool's tensorline-sandbox-<pid> root.
if "tensorline-sandbox-" in os.environ.get("TMPDIR", ""):
    os._exit(3)
