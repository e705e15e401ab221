"""The built-in node catalogue, registered as trusted under the ``builtin`` entry point."""

from tensorline.server.nodes.builtin._audio import AudioResample
from tensorline.server.nodes.builtin._basic import (
    Add,
    Calculator,
    Cast,
    Normalize,
    PassThrough,
    Reshape,
    Scale,
)

TENSORLINE_NODES = (PassThrough, Scale, Add, Calculator, Cast, Reshape, Normalize, AudioResample)

__all__ = [
    "TENSORLINE_NODES",
    "Add",
    "AudioResample",
    "Calculator",
    "Cast",
    "Normalize",
    "PassThrough",
    "Reshape",
    "Scale",
]
