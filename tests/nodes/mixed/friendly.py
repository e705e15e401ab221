"""The trusted half of ``tests.nodes.mixed``."""

from __future__ import annotations

from tensorline.server.nodes import Node


class MixedFriendly(Node):
    """Trusted."""
