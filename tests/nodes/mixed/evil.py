"""The untrusted half of ``tests.nodes.mixed``: importing it in the server is the failure the
registry's tests look for."""

from __future__ import annotations

from tensorline.server.nodes import Node

raise AssertionError("tests.nodes.mixed.evil was imported")


class MixedEvil(Node):
    """Never reached."""
