"""scipy nodes: a Butterworth low-pass filter (the other scipy node is the built-in
``AudioResample``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import Field

from tensorline.server.nodes._node import NodeParams, NodeTraits, Port, WarmUp
from tensorline.server.nodes._streaming import Chunk, StreamingNode
from tensorline.wire import Audio

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


class _Lowpass:
    """One signal's filter: the design for its rate and the filter state (``zi``) between the
    pieces it arrives in. sosfilt runs sample by sample, so carrying the state makes any split of
    the signal give exactly the output of one call over all of it."""

    def __init__(self, order: int, cutoff_hz: float, first: Audio) -> None:
        from scipy.signal import sosfilt

        self._sosfilt = sosfilt
        self.rate = first.sample_rate
        nyquist = self.rate / 2
        if cutoff_hz >= nyquist:
            raise ValueError(f"cutoff_hz={cutoff_hz} must be below the Nyquist frequency "
                             f"{nyquist} Hz of {self.rate} Hz audio")
        # A private copy (a few hundred bytes): sosfilt's Cython core needs a writable array
        # and the cached design is shared read-only.
        self.sos = butter_sos(order, cutoff_hz, self.rate).copy()
        # At rest: sosfilt's own starting state when it is given none.
        self.zi = np.zeros((len(self.sos), 2, *first.samples.shape[1:]))

    def __call__(self, audio: Audio) -> Audio:
        samples = audio.samples
        if audio.sample_rate != self.rate:
            raise ValueError(f"sample rate changed from {self.rate} to {audio.sample_rate} Hz "
                             "mid-stream")
        if samples.shape[1:] != self.zi.shape[2:]:
            raise ValueError(f"channel layout changed from {self.zi.shape[2:]} to "
                             f"{samples.shape[1:]} mid-stream")
        integer = np.issubdtype(samples.dtype, np.integer)
        out, self.zi = self._sosfilt(self.sos, samples.astype(np.float64) if integer else samples,
                                     axis=0, zi=self.zi)
        if integer:
            info = np.iinfo(samples.dtype)
            out = np.clip(np.rint(out), info.min, info.max).astype(samples.dtype)
        else:
            out = out.astype(samples.dtype, copy=False)
        return Audio(np.ascontiguousarray(out), audio.sample_rate)


class ButterLowpass(StreamingNode):
    """Low-pass filter audio with a Butterworth filter (scipy.signal.butter + sosfilt).

    Second-order sections keep high orders numerically stable. The filter is causal (one pass,
    like an analogue filter), runs along the time axis of every channel, and starts from rest.
    Integer PCM is filtered in float64 and rounded back to its dtype with clipping; float input
    keeps its dtype.

    In a StreamPipeline session the filter state carries from chunk to chunk, so a signal
    streamed in chunks of any size gives exactly (bit for bit) the output of one unary call over
    the whole signal; one output per chunk, nothing held back.
    """

    Params = ButterLowpassParams
    params: ButterLowpassParams
    inputs = (Port("in", kind="audio"),)
    outputs = (Port("out", kind="audio"),)
    traits = NodeTraits(libraries=("scipy",))
    # Imports scipy.signal and runs butter + sosfilt once (a tenth of a second of 16 kHz audio).
    warmup = (WarmUp({"in": Audio(np.zeros(1600, dtype=np.float32), 16000)},
                     {"cutoff_hz": 1000.0}),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        audio: Audio = inputs["in"]
        return _Lowpass(self.params.order, self.params.cutoff_hz, audio)(audio)

    def stream(self, chunks: Iterator[Chunk]) -> Iterator[Any]:
        lowpass: _Lowpass | None = None
        for chunk in chunks:
            audio: Audio = chunk.value
            lowpass = lowpass or _Lowpass(self.params.order, self.params.cutoff_hz, audio)
            yield lowpass(audio)


TENSORLINE_NODES = (ButterLowpass,)
