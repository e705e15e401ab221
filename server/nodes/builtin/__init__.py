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
from tensorline.server.nodes.builtin._streaming import (
    Accumulator,
    AudioChunker,
    VoiceActivityGate,
)

TENSORLINE_NODES = (PassThrough, Scale, Add, Calculator, Cast, Reshape, Normalize, AudioResample,
                    AudioChunker, Accumulator, VoiceActivityGate)

__all__ = [
    "TENSORLINE_NODES",
    "Accumulator",
    "Add",
    "AudioChunker",
    "AudioResample",
    "Calculator",
    "Cast",
    "Normalize",
    "PassThrough",
    "Reshape",
    "Scale",
    "VoiceActivityGate",
]
