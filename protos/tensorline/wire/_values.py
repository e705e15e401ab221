"""Python-side value types that travel through pipelines.

Tensors are plain ``numpy.ndarray``; text is ``str``; binary is ``bytes``. Audio and JSON need a
wrapper so that the codec knows which wire kind to use (an audio buffer is a tensor plus a sample
rate; JSON and text are both strings on the wire).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class Audio:
    """Audio samples shaped ``(frames,)`` or ``(frames, channels)`` at ``sample_rate`` Hz.

    Integer sample dtypes are PCM and keep their dtype end to end (int16 is never read as float).
    """

    samples: npt.NDArray[Any]
    sample_rate: int

    @property
    def channels(self) -> int:
        return 1 if self.samples.ndim < 2 else int(self.samples.shape[1])

    @property
    def duration_s(self) -> float:
        return float(self.samples.shape[0]) / self.sample_rate if self.sample_rate else 0.0


@dataclass(frozen=True, slots=True)
class Json:
    """A JSON document (any JSON-serialisable Python value)."""

    value: Any


@dataclass(frozen=True, slots=True)
class Tagged:
    """A value with a string metadata map attached (the wire's ``Value.metadata``)."""

    value: Any
    metadata: dict[str, str] = field(default_factory=dict)


def kind_of(value: Any) -> str:
    """The wire kind of a Python value: tensor, audio, text, json or binary."""
    if isinstance(value, Tagged):
        return kind_of(value.value)
    if isinstance(value, np.ndarray | np.generic):
        return "tensor"
    if isinstance(value, Audio):
        return "audio"
    if isinstance(value, str):
        return "text"
    if isinstance(value, Json):
        return "json"
    if isinstance(value, bytes | bytearray | memoryview):
        return "binary"
    raise TypeError(
        f"cannot send a value of type {type(value).__name__}; use a numpy array, "
        "tensorline.client.Audio, str, tensorline.client.Json or bytes"
    )
