"""An untrusted node module whose import fails: the server must report it and load the rest."""

from __future__ import annotations

from tensorline.server.nodes import Node


class NeverListed(Node):
    """Would be listed if the module imported."""


raise RuntimeError("untrusted_broken refuses to import")
