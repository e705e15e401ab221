"""Built-in streaming nodes for real-time media: re-framing, batching and voice activity.

They are async generators (cheap numpy work per chunk, run on the loop without a thread hop)
and keep their state in generator locals, so every session has its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from tensorline.server.nodes._node import NodeParams, Port
from tensorline.server.nodes._streaming import Chunk, StreamingNode
from tensorline.wire import Audio, Tagged


def _audio(chunk: Chunk) -> Audio:
    value = chunk.value
    return value.value if isinstance(value, Tagged) else value  # type: ignore[no-any-return]


class _SampleBuffer:
    """Audio samples held between chunks; appends without re-copying what is already held."""

    def __init__(self) -> None:
        self.parts: list[npt.NDArray[Any]] = []
        self.frames = 0
        self.rate = 0

    def add(self, audio: Audio) -> None:
        if self.rate and audio.sample_rate != self.rate:
            raise ValueError(f"sample rate changed from {self.rate} to {audio.sample_rate} Hz "
                             "mid-stream")
        self.rate = audio.sample_rate
        if len(audio.samples):
            self.parts.append(audio.samples)
            self.frames += len(audio.samples)

    def take(self, frames: int) -> npt.NDArray[Any]:
        """Remove and return the first ``frames`` frames (one concatenation)."""
        held = self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)
        out, rest = held[:frames], held[frames:]
        self.parts = [rest] if len(rest) else []
        self.frames = len(rest)
        return out


class AudioChunkerParams(NodeParams):
    frame_ms: float | None = Field(None, gt=0, description="frame length in milliseconds")
    frame_samples: int | None = Field(None, gt=0, description="frame length in samples")
    pad_last: bool = Field(False, description="zero-pad the final partial frame to full length")

    @model_validator(mode="after")
    def _one_length(self) -> AudioChunkerParams:
        if (self.frame_ms is None) == (self.frame_samples is None):
            raise ValueError("set exactly one of frame_ms and frame_samples")
        return self


class AudioChunker(StreamingNode):
    """Fixed-size audio frames from arbitrarily sized chunks; the remainder is flushed at the
    end of the stream (shorter, or zero-padded with ``pad_last``)."""

    Params = AudioChunkerParams
    params: AudioChunkerParams
    inputs = (Port("in", kind="audio"),)
    outputs = (Port("out", kind="audio"),)

    async def stream(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Any]:
        buffer = _SampleBuffer()
        size = 0
        async for chunk in chunks:
            buffer.add(_audio(chunk))
            if not size:
                size = self.params.frame_samples or max(
                    1, round(buffer.rate * (self.params.frame_ms or 0) / 1000))
            while buffer.frames >= size:
                yield Audio(buffer.take(size), buffer.rate)
        if buffer.frames:
            last = buffer.take(buffer.frames)
            if self.params.pad_last and len(last) < size:
                pad = np.zeros((size - len(last), *last.shape[1:]), dtype=last.dtype)
                last = np.concatenate([last, pad])
            yield Audio(last, buffer.rate)


class AccumulatorParams(NodeParams):
    count: int | None = Field(None, gt=0, description="emit every N chunks")
    duration_ms: float | None = Field(None, gt=0,
                                      description="audio: emit once this much is held")

    @model_validator(mode="after")
    def _one_rule(self) -> AccumulatorParams:
        if (self.count is None) == (self.duration_ms is None):
            raise ValueError("set exactly one of count and duration_ms")
        return self


class Accumulator(StreamingNode):
    """N -> 1: concatenates chunks (tensors along axis 0, or audio) every ``count`` chunks or
    once ``duration_ms`` of audio is held; what is left is flushed at the end of the stream."""

    Params = AccumulatorParams
    params: AccumulatorParams
    inputs = (Port("in", description="tensor or audio"),)
    outputs = (Port("out", description="the concatenation, same kind as the input"),)

    async def stream(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Any]:
        held: list[Any] = []
        frames = 0
        for_audio = False
        async for chunk in chunks:
            value = chunk.value
            value = value.value if isinstance(value, Tagged) else value
            for_audio = isinstance(value, Audio)
            if self.params.duration_ms is not None and not for_audio:
                raise TypeError("duration_ms needs audio input; use count for tensors")
            held.append(value)
            if for_audio:
                frames += len(value.samples)
                full = frames * 1000 >= (self.params.duration_ms or 0) * value.sample_rate
            else:
                full = False
            if self.params.count is not None:
                full = len(held) >= self.params.count
            if full:
                yield self._join(held, for_audio)
                held, frames = [], 0
        if held:
            yield self._join(held, for_audio)

    @staticmethod
    def _join(held: list[Any], for_audio: bool) -> Any:
        if for_audio:
            rates = {a.sample_rate for a in held}
            if len(rates) != 1:
                raise ValueError(f"cannot join audio of different sample rates {sorted(rates)}")
            return Audio(np.concatenate([a.samples for a in held]), held[0].sample_rate)
        arrays = [np.asarray(a) for a in held]
        if all(a.ndim == 0 for a in arrays):
            return np.stack(arrays)
        return np.concatenate(arrays)


class VoiceActivityGateParams(NodeParams):
    threshold_db: float = Field(-35.0, le=0, description="frame energy (dBFS) that counts as "
                                                         "speech")
    frame_ms: float = Field(20.0, gt=0, le=1000, description="analysis frame length")
    hangover_ms: float = Field(200.0, ge=0, description="silence that ends a segment")
    min_speech_ms: float = Field(60.0, ge=0, description="shorter segments are dropped")


class VoiceActivityGate(StreamingNode):
    """Energy-based voice activity: passes speech segments, drops silence.

    Audio is analysed in ``frame_ms`` frames; a frame whose RMS level reaches ``threshold_db``
    (dB relative to full scale: 1.0 for float audio, the integer range for PCM) is speech. A
    segment starts at the first speech frame and ends after ``hangover_ms`` of silence; it is
    emitted as one audio value (including the hangover) tagged with ``start_s`` and ``end_s``
    metadata, or dropped when shorter than ``min_speech_ms``. A segment still open at the end of
    the stream is flushed.
    """

    Params = VoiceActivityGateParams
    params: VoiceActivityGateParams
    inputs = (Port("in", kind="audio"),)
    outputs = (Port("out", kind="audio", description="speech segments"),)

    async def stream(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Any]:
        buffer = _SampleBuffer()
        segment: list[npt.NDArray[Any]] = []
        start = 0  # first frame of the open segment (in samples since the stream began)
        position = 0  # samples analysed so far
        silence = 0  # trailing silent samples in the open segment
        speech = 0  # speech samples in the open segment
        size = 0
        scale = 1.0
        async for chunk in chunks:
            buffer.add(_audio(chunk))
            if not size:
                size = max(1, round(buffer.rate * self.params.frame_ms / 1000))
                dtype = buffer.parts[0].dtype if buffer.parts else np.dtype(np.float32)
                if np.issubdtype(dtype, np.integer):
                    scale = float(np.iinfo(str(dtype)).max) + 1.0
            hangover = round(buffer.rate * self.params.hangover_ms / 1000)
            while buffer.frames >= size:
                frame = buffer.take(size)
                level = self._level_db(frame, scale)
                if level >= self.params.threshold_db:
                    if not segment:
                        start = position
                    segment.append(frame)
                    speech += len(frame)
                    silence = 0
                elif segment:
                    segment.append(frame)
                    silence += len(frame)
                    if silence >= hangover:
                        out = self._segment(segment, start, speech, buffer.rate)
                        if out is not None:
                            yield out
                        segment, speech, silence = [], 0, 0
                position += len(frame)
        if buffer.frames and segment:
            segment.append(buffer.take(buffer.frames))
        if segment:
            out = self._segment(segment, start, speech, buffer.rate)
            if out is not None:
                yield out

    @staticmethod
    def _level_db(frame: npt.NDArray[Any], scale: float) -> float:
        samples = frame.astype(np.float64) / scale
        rms = float(np.sqrt(np.mean(np.square(samples)))) if samples.size else 0.0
        return 20.0 * float(np.log10(rms)) if rms > 0 else -np.inf

    def _segment(self, frames: list[npt.NDArray[Any]], start: int, speech: int,
                 rate: int) -> Any:
        if speech * 1000 < self.params.min_speech_ms * rate:
            return None
        samples = np.concatenate(frames)
        return Tagged(Audio(samples, rate), {
            "start_s": f"{start / rate:.6f}",
            "end_s": f"{(start + len(samples)) / rate:.6f}",
        })
