"""Built-in streaming nodes through a real server: AudioChunker, Accumulator, VoiceActivityGate."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tensorline.client import AsyncClient, Audio, InvalidRequestError, StreamOutput, Tagged
from tests.support.manifests import one_node

RATE = 16000

async def run(client: AsyncClient, manifest: dict[str, Any], values: list[Any]) -> list[StreamOutput]:
    async with client.stream(manifest) as s:
        for value in values:
            await s.send("n", value)
        await s.close()
        return [out async for out in s]


def pieces(samples: np.ndarray, sizes: list[int]) -> list[Audio]:
    out, start = [], 0
    for size in sizes:
        out.append(Audio(samples[start:start + size], RATE))
        start += size
    assert start == len(samples)
    return out


async def test_audio_chunker_reframes_and_flushes(client: AsyncClient) -> None:
    samples = (np.arange(2000) % 3000).astype(np.int16)
    outputs = await run(client, one_node("AudioChunker", {"frame_ms": 20}),
                        pieces(samples, [100, 333, 7, 1000, 560]))
    frames = [o.value for o in outputs]
    assert [len(f.samples) for f in frames] == [320] * 6 + [80]
    assert all(f.samples.dtype == np.int16 and f.sample_rate == RATE for f in frames)
    assert np.array_equal(np.concatenate([f.samples for f in frames]), samples)
    assert outputs[-1].sequence == -1  # the remainder is a flush
    assert [o.sequence for o in outputs[:6]] == [1, 3, 3, 3, 4, 4]


async def test_audio_chunker_pads_the_last_frame(client: AsyncClient) -> None:
    samples = np.ones((500, 2), dtype=np.float32)
    outputs = await run(client, one_node("AudioChunker", {"frame_samples": 320, "pad_last": True}),
                        pieces(samples, [500]))
    assert [o.value.samples.shape for o in outputs] == [(320, 2), (320, 2)]
    assert outputs[1].value.samples[180:].sum() == 0


async def test_audio_chunker_params_are_validated(client: AsyncClient) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        async with client.stream(one_node("AudioChunker", {"frame_ms": 20, "frame_samples": 5})):
            pass
    assert "exactly one" in caught.value.violations[0].description


async def test_accumulator_by_count(client: AsyncClient) -> None:
    values = [np.full((2, 3), i, dtype=np.float32) for i in range(7)]
    outputs = await run(client, one_node("Accumulator", {"count": 3}), values)
    assert [o.value.shape for o in outputs] == [(6, 3), (6, 3), (2, 3)]
    assert [o.sequence for o in outputs] == [2, 5, -1]
    assert np.array_equal(np.concatenate([o.value for o in outputs]), np.concatenate(values))


async def test_accumulator_by_duration(client: AsyncClient) -> None:
    samples = np.arange(RATE, dtype=np.int16)  # 1 s
    outputs = await run(client, one_node("Accumulator", {"duration_ms": 250}),
                        pieces(samples, [1600] * 10))  # 100 ms chunks
    assert [len(o.value.samples) for o in outputs] == [4800, 4800, 4800, 1600]
    assert np.array_equal(np.concatenate([o.value.samples for o in outputs]), samples)


def speech_fixture() -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Silence with two tones (speech stand-ins) at known times."""
    t = np.arange(int(2.0 * RATE)) / RATE
    audio = np.zeros_like(t)
    spans = [(0.5, 0.9), (1.4, 1.7)]
    for start, end in spans:
        mask = (t >= start) & (t < end)
        audio[mask] = 0.5 * np.sin(2 * np.pi * 300 * t[mask])
    audio += np.random.default_rng(0).normal(0, 1e-4, len(t))  # faint noise floor
    return (audio * 32767).astype(np.int16), spans


async def test_voice_activity_gate_emits_speech_segments(client: AsyncClient) -> None:
    samples, spans = speech_fixture()
    chunk = RATE // 50  # 20 ms chunks, like a microphone
    outputs = await run(client, one_node("VoiceActivityGate", {"hangover_ms": 100}),
                        pieces(samples, [chunk] * (len(samples) // chunk)))
    assert len(outputs) == 2
    for out, (start, end) in zip(outputs, spans, strict=True):
        assert isinstance(out.value, Tagged) and isinstance(out.value.value, Audio)
        assert abs(float(out.value.metadata["start_s"]) - start) <= 0.02
        segment = out.value.value
        assert segment.samples.dtype == np.int16
        # The segment covers the speech plus at most the hangover and one frame.
        assert end - start <= segment.duration_s <= end - start + 0.1 + 0.04


async def test_voice_activity_gate_flushes_an_open_segment(client: AsyncClient) -> None:
    samples = (0.5 * np.sin(np.arange(8000) / 5) * 32767).astype(np.int16)  # speech to the end
    outputs = await run(client, one_node("VoiceActivityGate"), pieces(samples, [3000, 5000]))
    assert len(outputs) == 1 and outputs[0].sequence == -1
    assert len(outputs[0].value.value.samples) == 8000
