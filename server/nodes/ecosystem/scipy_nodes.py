"""scipy nodes: a Butterworth low-pass filter (the other scipy node is the built-in
``AudioResample``)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import Field

from tensorline.client._values import Audio
from tensorline.server.nodes._node import Node, NodeParams, NodeTraits, Port

TENSORLINE_REQUIRES = ("scipy",)


class ButterLowpassParams(NodeParams):
    cutoff_hz: float = Field(gt=0, description="-3 dB cutoff frequency in Hz (below Nyquist)")
    order: int = Field(4, ge=1, le=24, description="filter order")


@lru_cache(maxsize=64)
def butter_sos(order: int, cutoff_hz: float, sample_rate: int) -> npt.NDArray[np.float64]:
    """Second-order sections of the filter; cached because designing it costs more than
    filtering a short buffer, and the same (order, cutoff, rate) repeats across requests."""
    from scipy.signal import butter

    sos: npt.NDArray[np.float64] = butter(order, cutoff_hz, btype="lowpass", fs=sample_rate,
                                          output="sos")
    sos.flags.writeable = False  # shared between threads through the cache
    return sos


class ButterLowpass(Node):
    """Low-pass filter audio with a Butterworth filter (scipy.signal.butter + sosfilt).

    Second-order sections keep high orders numerically stable. The filter is causal (one pass,
    like an analogue filter), runs along the time axis of every channel, and starts from rest.
    Integer PCM is filtered in float64 and rounded back to its dtype with clipping; float input
    keeps its dtype.
    """

    Params = ButterLowpassParams
    params: ButterLowpassParams
    inputs = (Port("in", kind="audio"),)
    outputs = (Port("out", kind="audio"),)
    traits = NodeTraits(libraries=("scipy",))

    def process(self, inputs: Mapping[str, Any]) -> Any:
        from scipy.signal import sosfilt

        audio: Audio = inputs["in"]
        nyquist = audio.sample_rate / 2
        if self.params.cutoff_hz >= nyquist:
            raise ValueError(f"cutoff_hz={self.params.cutoff_hz} must be below the Nyquist "
                             f"frequency {nyquist} Hz of {audio.sample_rate} Hz audio")
        # A private copy (a few hundred bytes): sosfilt's Cython core needs a writable array
        # and the cached design is shared read-only.
        sos = butter_sos(self.params.order, self.params.cutoff_hz, audio.sample_rate).copy()
        samples = audio.samples
        if np.issubdtype(samples.dtype, np.integer):
            info = np.iinfo(samples.dtype)
            out = sosfilt(sos, samples.astype(np.float64), axis=0)
            out = np.clip(np.rint(out), info.min, info.max).astype(samples.dtype)
        else:
            out = sosfilt(sos, samples, axis=0).astype(samples.dtype, copy=False)
        return Audio(np.ascontiguousarray(out), audio.sample_rate)


TENSORLINE_NODES = (ButterLowpass,)
