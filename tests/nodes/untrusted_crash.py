"""An untrusted node module whose import kills its process, but only inside a sandbox worker:
imported anywhere else by mistake it must not take the test runner down with it."""

from __future__ import annotations

import multiprocessing
import os

from tensorline.server.nodes import Node


class NeverListedEither(Node):
    """Would be listed if the module imported."""


if multiprocessing.current_process().name.startswith("tensorline-sandbox"):
    os._exit(3)
