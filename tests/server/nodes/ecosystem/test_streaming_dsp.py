"""Stateful DSP nodes in StreamPipeline sessions, through a real server: a signal streamed in
chunks of any size (1 sample, a prime, uneven sizes, all at once) gives the unary result,
bit for bit for ButterLowpass and within AudioResample's stated tolerance."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tensorline.client import AsyncClient, Audio, NodeError
from tensorline.server.nodes.builtin._audio import (
    STREAM_TOLERANCE_FLOAT32,
    STREAM_TOLERANCE_FLOAT64,
    STREAM_TOLERANCE_INT,
)
from tests.server.nodes.ecosystem.conftest import (
    RUNTIMES,
    SANDBOX_UNAVAILABLE,
    assert_bit_exact,
    run_node,
)
from tests.support.manifests import one_node

CHUNKINGS = {"1 sample": [1], "prime 37": [37], "uneven": [500, 1, 64, 3, 999, 2],
             "whole": [1_000_000]}


def signal(rate: int, frames: int, dtype: str, channels: int = 1) -> np.ndarray:
    """A tone with noise near full scale (about +/-9,800 for int16), so every boundary error shows."""
    rng = np.random.default_rng(3)
    t = np.arange(frames) / rate
    x = 0.2 * np.sin(2 * np.pi * 440 * t) + 0.1 * rng.standard_normal(frames)
    if channels > 1:
        x = np.stack([x * (1 - c / 3) for c in range(channels)], axis=1)
    if dtype == "int16":
        return np.round(x * 32767).astype(np.int16)
    return x.astype(dtype)


def split(samples: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    pieces, start, i = [], 0, 0
    while start < len(samples):
        size = sizes[i % len(sizes)]
        pieces.append(samples[start:start + size])
        start, i = start + size, i + 1
    return pieces


async def stream(client: AsyncClient, manifest: dict[str, Any], pieces: list[np.ndarray],
                 rate: int, runtime: str) -> tuple[np.ndarray, int]:
    """The session's outputs of node ``n`` concatenated and their rate; it ran in ``runtime``."""
    async with client.stream(manifest) as s:
        for piece in pieces:
            await s.send("n", Audio(piece, rate))
        metrics = await s.close()
        outputs = [out.value async for out in s]
    [node] = metrics.nodes
    if runtime == "sandbox" and SANDBOX_UNAVAILABLE in node.selection_reason:
        pytest.skip("this server has no sandbox runtime")
    assert (node.runtime, node.fallback) == (runtime, ""), node
    rates = {out.sample_rate for out in outputs}
    assert len(rates) == 1
    return np.concatenate([out.samples for out in outputs]), rates.pop()


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(("dtype", "channels"), [("int16", 1), ("float32", 1), ("float64", 2)])
async def test_butter_lowpass_streams_bit_exact(eco_client: AsyncClient, runtime: str,
                                                dtype: str, channels: int) -> None:
    rate, params = 16000, {"cutoff_hz": 1000, "order": 6}
    samples = signal(rate, 3000, dtype, channels)
    unary = await run_node(eco_client, runtime, "ButterLowpass", params,
                           {"in": Audio(samples, rate)})
    manifest = one_node("ButterLowpass", params, runtime)
    for name, sizes in CHUNKINGS.items():
        out, out_rate = await stream(eco_client, manifest, split(samples, sizes), rate, runtime)
        assert out_rate == rate
        assert_bit_exact(out, unary["n"].samples), name


def tolerance(samples: np.ndarray) -> float:
    if samples.dtype == np.int16:
        return STREAM_TOLERANCE_INT
    relative = STREAM_TOLERANCE_FLOAT32 if samples.dtype == np.float32 else STREAM_TOLERANCE_FLOAT64
    return relative * float(np.max(np.abs(samples)))


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(("rates", "dtype", "channels"), [
    ((48000, 16000), "int16", 1),
    ((44100, 16000), "int16", 1),
    ((16000, 44100), "float32", 1),
    ((8000, 11025), "float64", 2),
])
async def test_audio_resample_streams_within_tolerance(
        eco_client: AsyncClient, runtime: str, rates: tuple[int, int], dtype: str,
        channels: int) -> None:
    rate, target = rates
    samples = signal(rate, 2000, dtype, channels)
    params = {"target_rate": target}
    expected = (await run_node(eco_client, runtime, "AudioResample", params,
                               {"in": Audio(samples, rate)}))["n"].samples
    manifest = one_node("AudioResample", params, runtime)
    for name, sizes in CHUNKINGS.items():
        out, out_rate = await stream(eco_client, manifest, split(samples, sizes), rate, runtime)
        assert out_rate == target
        assert (out.dtype, out.shape) == (expected.dtype, expected.shape), name
        difference = np.max(np.abs(out.astype(np.float64) - expected.astype(np.float64)))
        assert difference <= tolerance(samples), (name, difference)


async def test_resample_then_lowpass_in_one_session(eco_client: AsyncClient) -> None:
    """A chain: the resampler's flush reaches the filter, which carries its state through it."""
    manifest = {"nodes": [
        {"id": "n", "node_type": "AudioResample", "params": {"target_rate": 16000}},
        {"id": "lp", "node_type": "ButterLowpass", "params": {"cutoff_hz": 3000}},
    ], "connections": [{"from": "n", "to": "lp"}]}
    samples = signal(48000, 6000, "int16")
    unary = (await eco_client.execute(manifest, {"n": Audio(samples, 48000)}))["lp"].samples
    async with eco_client.stream(manifest) as s:
        for piece in split(samples, [960, 7, 333]):
            await s.send("n", Audio(piece, 48000))
        await s.close()
        out = np.concatenate([o.value.samples async for o in s])
    assert out.shape == unary.shape
    # The filter is exact; what it is given differs from the unary run's within the
    # resampler's tolerance, and a low-pass filter's gain (at most about 1) keeps it there.
    assert np.max(np.abs(out.astype(np.int32) - unary.astype(np.int32))) <= 2


async def test_a_rate_change_mid_stream_is_the_node_error(eco_client: AsyncClient) -> None:
    manifest = one_node("ButterLowpass", {"cutoff_hz": 1000}, "inprocess")
    with pytest.raises(NodeError, match="sample rate changed from 16000 to 8000 Hz"):
        async with eco_client.stream(manifest) as s:
            await s.send("n", Audio(np.zeros(10, np.float32), 16000))
            await s.send("n", Audio(np.zeros(10, np.float32), 8000))
            await s.close()
            async for _ in s:
                pass
