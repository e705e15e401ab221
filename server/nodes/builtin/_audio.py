"""Audio nodes."""

from __future__ import annotations

from collections.abc import Mapping
from math import gcd
from typing import Any

import numpy as np
from pydantic import Field

from tensorline.client._values import Audio
from tensorline.server.nodes._node import Node, NodeParams, Port


class AudioResampleParams(NodeParams):
    target_rate: int = Field(gt=0, le=1_536_000, description="output sample rate in Hz")


class AudioResample(Node):
    """Resample audio to a target rate with a polyphase filter (scipy.signal.resample_poly).

    Works for any rate pair; integer PCM input is resampled in float64 and rounded back to its
    dtype with clipping, so int16 stays int16.
    """

    Params = AudioResampleParams
    params: AudioResampleParams
    inputs = (Port("in", kind="audio"),)
    outputs = (Port("out", kind="audio"),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        from scipy.signal import resample_poly

        audio: Audio = inputs["in"]
        target = self.params.target_rate
        if audio.sample_rate == target:
            return audio
        divisor = gcd(audio.sample_rate, target)
        up, down = target // divisor, audio.sample_rate // divisor
        samples = audio.samples
        if np.issubdtype(samples.dtype, np.integer):
            info = np.iinfo(samples.dtype)
            out = resample_poly(samples.astype(np.float64), up, down, axis=0)
            out = np.clip(np.rint(out), info.min, info.max).astype(samples.dtype)
        else:
            out = resample_poly(samples, up, down, axis=0).astype(samples.dtype, copy=False)
        return Audio(np.ascontiguousarray(out), target)
