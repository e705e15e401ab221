"""Audio nodes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from math import gcd
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import Field

from tensorline.server.nodes._node import NodeParams, Port, WarmUp
from tensorline.server.nodes._streaming import Chunk, StreamingNode
from tensorline.wire import Audio

# How far a streamed resampling may be from resampling the whole signal at once (see
# AudioResample): the same filter, with its sums taken in another order. Integer PCM: in sample
# values; float: times the signal's peak absolute value.
STREAM_TOLERANCE_INT = 1
STREAM_TOLERANCE_FLOAT32 = 1e-6
STREAM_TOLERANCE_FLOAT64 = 1e-12
# Output samples computed per block while streaming: bounds the (block x taps) gather.
_BLOCK = 4096


class AudioResampleParams(NodeParams):
    target_rate: int = Field(gt=0, le=1_536_000, description="output sample rate in Hz")


class AudioResample(StreamingNode):
    """Resample audio to a target rate with a polyphase filter (scipy.signal.resample_poly).

    Works for any rate pair; integer PCM input is resampled in float64 and rounded back to its
    dtype with clipping, so int16 stays int16.

    In a StreamPipeline session the resampler keeps the input history its filter needs across
    chunks: each chunk yields the output samples whose filter window it completed (possibly
    none: an empty audio value), and the end of the stream flushes the rest. The concatenated
    output has the unary result's length and differs from it by at most 1 for integer PCM (a
    value within rounding of .5 may round the other way), and by at most 1e-6 (float32) or
    1e-12 (float64) times the signal's peak absolute value for float audio: the same filter,
    summed in another order (and for float32, in float64 where the unary call uses float32).
    Latency: the filter's half length, 10 x max(up, down) input samples at the reduced ratio
    up/down (30 samples for 48 -> 16 kHz).
    """

    Params = AudioResampleParams
    params: AudioResampleParams
    inputs = (Port("in", kind="audio"),)
    outputs = (Port("out", kind="audio"),)
    # The first call imports scipy.signal (~0.7-1.5 s); a tenth of a second of int16 audio,
    # 48 -> 16 kHz, makes that import and resample_poly's first use happen at start instead.
    warmup = (WarmUp({"in": Audio(np.zeros(4800, dtype=np.int16), 48000)},
                     {"target_rate": 16000}),)

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
            out = resample_poly(samples.astype(np.float64), up, down, axis=0)
        else:
            out = resample_poly(samples, up, down, axis=0)
        return Audio(_as_dtype(out, samples.dtype), target)

    def stream(self, chunks: Iterator[Chunk]) -> Iterator[Any]:
        target = self.params.target_rate
        resampler: _StreamingResampler | None = None
        for chunk in chunks:
            audio: Audio = chunk.value
            if resampler is None:
                if audio.sample_rate == target:
                    yield audio
                    continue
                resampler = _StreamingResampler(audio.sample_rate, target, audio.samples)
            yield resampler.push(audio)
        if resampler is not None:
            yield resampler.finish()


def _as_dtype(out: npt.NDArray[Any], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """Filtered samples back in the input's dtype: integers rounded and clipped."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return np.ascontiguousarray(out.astype(dtype, copy=False))


class _StreamingResampler:
    """resample_poly's filter applied to a signal that arrives in pieces.

    resample_poly's output sample k is ``sum_n x[n] * h[k*down + half - n*up]`` over the input
    samples n where the tap index lies in [0, 2*half], with x zero outside the signal (its
    default padding) and ``h = firwin(2*half + 1, 1/max(up, down), window=("kaiser", 5.0)) * up``.
    Output k is ready once input ``(k*down + half) // up`` has arrived; the end of the stream
    supplies the zeros past the end and completes the remaining ``ceil(n*up/down)`` outputs.
    """

    def __init__(self, rate: int, target: int, first: npt.NDArray[Any]) -> None:
        from scipy.signal import firwin

        divisor = gcd(rate, target)
        self.rate, self.target = rate, target
        self.up, self.down = target // divisor, rate // divisor
        self.half = 10 * max(self.up, self.down)
        self.dtype = first.dtype
        taps = firwin(2 * self.half + 1, 1.0 / max(self.up, self.down),
                      window=("kaiser", 5.0)) * self.up
        # Polyphase form: phase p of output k is (k*down + half) % up; its taps are
        # h[p], h[p + up], ... applied to x[n_last], x[n_last - 1], ...
        self.width = 2 * self.half // self.up + 1
        padded = np.zeros(self.up * self.width)
        padded[:len(taps)] = taps
        self.phases = padded.reshape(self.width, self.up).T
        # Input history from global index ``self.start`` on; the zeros before the signal are
        # resample_poly's padding, so the first outputs need no special case.
        self.held = np.zeros((self.width, *first.shape[1:]))
        self.start = -self.width
        self.received = 0
        self.emitted = 0

    def push(self, audio: Audio) -> Audio:
        samples = audio.samples
        if audio.sample_rate != self.rate:
            raise ValueError(f"sample rate changed from {self.rate} to {audio.sample_rate} Hz "
                             "mid-stream")
        if samples.shape[1:] != self.held.shape[1:]:
            raise ValueError(f"channel layout changed from {self.held.shape[1:]} to "
                             f"{samples.shape[1:]} mid-stream")
        self.held = np.concatenate((self.held, samples.astype(np.float64)))
        self.received += len(samples)
        # Output k is ready when its last input, (k*down + half) // up, has arrived.
        ready = max(self.emitted, (self.received * self.up - self.half - 1) // self.down + 1)
        return self._emit(ready)

    def finish(self) -> Audio:
        total = -(-self.received * self.up // self.down)
        self.held = np.concatenate((self.held, np.zeros((self.width, *self.held.shape[1:]))))
        return self._emit(total)

    def _emit(self, end: int) -> Audio:
        """Outputs ``self.emitted`` up to ``end``, then forget the input no later output needs."""
        blocks = [self._block(k, min(k + _BLOCK, end)) for k in range(self.emitted, end, _BLOCK)]
        out = (np.concatenate(blocks) if blocks
               else np.zeros((0, *self.held.shape[1:])))
        self.emitted = max(self.emitted, end)
        keep_from = (self.emitted * self.down + self.half) // self.up - (self.width - 1)
        drop = max(0, keep_from - self.start)
        self.held, self.start = self.held[drop:], self.start + drop
        return Audio(_as_dtype(out, self.dtype), self.target)

    def _block(self, first: int, end: int) -> npt.NDArray[np.float64]:
        position = np.arange(first, end) * self.down + self.half
        last = position // self.up - self.start   # each output's newest input, in ``held``
        window = self.held[last[:, None] - np.arange(self.width)]
        weights = self.phases[position % self.up]
        if window.ndim == 2:
            return (window * weights).sum(axis=1)   # type: ignore[no-any-return]
        return np.einsum("kw,kw...->k...", weights, window)   # type: ignore[no-any-return]
