"""ButterLowpass, AudioResample (scipy) and PyHashChain (pure Python) through a real server, in
each runtime: correct against a direct library computation, and bit-exact across runtimes (both
run the same single-threaded scipy / Python code on the same bytes)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import butter, resample_poly, sosfilt

from tensorline.client import AsyncClient, Audio, NodeError
from tensorline.server.nodes.ecosystem.python_nodes import hash_chain
from tests.server.nodes.ecosystem.conftest import (
    RUNTIMES,
    assert_bit_exact,
    run_both,
    run_node,
)
from tests.support.manifests import one_node


def tone_noise(rate: int, seconds: float, dtype: str, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(7)
    t = np.arange(int(rate * seconds)) / rate
    signal = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * rng.standard_normal(t.size)
    if channels > 1:
        signal = np.stack([signal * (1 + c / 4) for c in range(channels)], axis=1)
    if dtype == "int16":
        return np.round(signal * 32767 * 0.5).astype(np.int16)
    return signal.astype(dtype)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(("dtype", "channels"), [("float32", 1), ("float64", 2), ("int16", 1)])
async def test_butter_lowpass_matches_scipy(eco_client: AsyncClient, runtime: str, dtype: str,
                                            channels: int) -> None:
    samples = tone_noise(16000, 0.5, dtype, channels)
    result = await run_node(eco_client, runtime, "ButterLowpass",
                            {"cutoff_hz": 1000, "order": 6}, {"in": Audio(samples, 16000)})
    out = result["n"]
    sos = butter(6, 1000, btype="lowpass", fs=16000, output="sos")
    if dtype == "int16":
        expected = sosfilt(sos, samples.astype(np.float64), axis=0)
        expected = np.clip(np.rint(expected), -32768, 32767).astype(np.int16)
    else:
        expected = sosfilt(sos, samples, axis=0).astype(dtype)
    assert out.sample_rate == 16000
    assert_bit_exact(out.samples, expected)


async def test_butter_lowpass_attenuates_above_cutoff(eco_client: AsyncClient) -> None:
    rate = 16000
    t = np.arange(rate) / rate
    low, high = np.sin(2 * np.pi * 200 * t), np.sin(2 * np.pi * 4000 * t)
    result = await run_node(eco_client, "inprocess", "ButterLowpass", {"cutoff_hz": 1000},
                            {"in": Audio((low + high).astype(np.float64), rate)})
    spectrum = np.abs(np.fft.rfft(result["n"].samples[rate // 2:]))
    freqs = np.fft.rfftfreq(rate // 2, 1 / rate)
    assert spectrum[np.argmin(np.abs(freqs - 4000))] < 0.01 * spectrum[np.argmin(np.abs(freqs - 200))]


async def test_butter_lowpass_rejects_cutoff_above_nyquist(eco_client: AsyncClient) -> None:
    with pytest.raises(NodeError, match="Nyquist"):
        await eco_client.execute(one_node("ButterLowpass", {"cutoff_hz": 9000}, "inprocess"),
                                 {"n": Audio(np.zeros(100, np.float32), 16000)})


@pytest.mark.parametrize("dtype", ["float32", "int16"])
async def test_scipy_nodes_bit_exact_across_runtimes(eco_client: AsyncClient, dtype: str) -> None:
    samples = tone_noise(44100, 0.3, dtype, 2)
    for node_type, params in [("ButterLowpass", {"cutoff_hz": 3000, "order": 8}),
                              ("AudioResample", {"target_rate": 16000})]:
        inprocess, sandboxed = await run_both(eco_client, node_type, params,
                                              {"in": Audio(samples, 44100)})
        assert inprocess["n"].sample_rate == sandboxed["n"].sample_rate
        assert_bit_exact(inprocess["n"].samples, sandboxed["n"].samples)
    # And both are right: integer PCM is resampled in float64, float32 in float32.
    if dtype == "int16":
        expected = resample_poly(samples.astype(np.float64), 160, 441, axis=0)
        expected = np.clip(np.rint(expected), -32768, 32767).astype(np.int16)
    else:
        expected = resample_poly(samples, 160, 441, axis=0).astype(dtype)
    assert_bit_exact(sandboxed["n"].samples, expected)


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_py_hash_chain_matches_reference(eco_client: AsyncClient, runtime: str) -> None:
    seed_tensor = np.arange(10, dtype=np.float32)
    import zlib

    result = await run_node(eco_client, runtime, "PyHashChain", {"iterations": 200_000},
                            {"in": seed_tensor})
    expected = hash_chain(zlib.crc32(seed_tensor.tobytes()), 200_000)
    assert_bit_exact(result["n"], np.array([expected], dtype=np.uint64))


def test_hash_chain_is_chunk_independent() -> None:
    # The node runs the chain in chunks (to check for cancellation in between).
    assert hash_chain(hash_chain(12345, 70_000), 30_000) == hash_chain(12345, 100_000)
    assert hash_chain(0, 10) == hash_chain(1, 10)


async def test_default_selection_sends_ecosystem_nodes_to_the_sandbox(
        eco_client: AsyncClient) -> None:
    """Without a hint, the declared traits decide (sandbox, or in-process with the reason when
    this server has no sandbox runtime)."""
    manifest = {"nodes": [
        {"id": "lp", "node_type": "ButterLowpass", "params": {"cutoff_hz": 1000}},
        {"id": "h", "node_type": "PyHashChain", "params": {"iterations": 10}},
    ]}
    result = await eco_client.execute(manifest, {"lp": Audio(np.zeros(64, np.float32), 16000),
                                                 "h": np.zeros(1)})
    reasons = {m.node_id: m for m in result.metrics.nodes}
    assert reasons["lp"].selection_reason.startswith("trait: uses heavy library scipy")
    assert reasons["h"].selection_reason.startswith("trait: cpu_bound")
    for metrics in reasons.values():
        expected = "inprocess" if "sandbox unavailable" in metrics.selection_reason else "sandbox"
        assert metrics.runtime == expected
