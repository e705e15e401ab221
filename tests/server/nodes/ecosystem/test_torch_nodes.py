"""TorchSpectrogram and TorchMLP through a real server in each runtime, against torch / numpy
called directly, and compared across runtimes.

Across runtimes the results are compared bit for bit: the worker runs the same torch build on
the same bytes. The one place where threads could make float sums differ is a matmul whose
reduction is split across threads; at these sizes torch's CPU kernels do not split the reduction
dimension, so equality holds (if a build ever changes that, the tolerance to use is float32
rounding, rtol=1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest

from tensorline.client import AsyncClient, Audio, NodeError
from tests.server.nodes.ecosystem.conftest import (
    RUNTIMES,
    assert_bit_exact,
    run_both,
    run_node,
)
from tests.support.manifests import one_node

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")

from tensorline.server.nodes.ecosystem.torch_nodes import (  # noqa: E402
    TorchMLPParams,
    build_mlp,
    mel_filterbank,
)

RATE = 16000
MLP = {"in_features": 40, "hidden": [32, 16], "out_features": 5, "seed": 11}


def audio(dtype: str = "float32", seconds: float = 1.0, channels: int = 1) -> Audio:
    rng = np.random.default_rng(5)
    t = np.arange(int(RATE * seconds)) / RATE
    signal = 0.3 * np.sin(2 * np.pi * 700 * t) + 0.1 * rng.standard_normal(t.size)
    if channels > 1:
        signal = np.stack([signal, -0.5 * signal][:channels], axis=1)
    if dtype == "int16":
        return Audio(np.round(signal * 32767).astype(np.int16), RATE)
    return Audio(signal.astype(dtype), RATE)


def numpy_stft_magnitude(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """An independent STFT: reflect-pad, periodic Hann, rfft per frame (float64)."""
    padded = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = 1 + (padded.size - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    return np.abs(np.fft.rfft(padded[idx] * window, axis=1))


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_spectrogram_matches_an_independent_stft(eco_client: AsyncClient,
                                                       runtime: str) -> None:
    sound = audio()
    result = await run_node(eco_client, runtime, "TorchSpectrogram",
                            {"n_fft": 256, "hop_length": 128}, {"in": sound})
    out = result["n"]
    expected = numpy_stft_magnitude(sound.samples, 256, 128)
    assert out.dtype == np.float32 and out.shape == expected.shape
    # float32 FFT vs float64 reference: error relative to the spectrum's scale.
    np.testing.assert_allclose(out, expected, atol=1e-4 * expected.max())


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_log_mel_matches_torch_called_directly(eco_client: AsyncClient,
                                                     runtime: str) -> None:
    sound = audio("int16", channels=2)
    params = {"n_fft": 512, "hop_length": 160, "n_mels": 40, "power": 2, "log": True}
    result = await run_node(eco_client, runtime, "TorchSpectrogram", params, {"in": sound})
    mono = (sound.samples.astype(np.float32) / np.float32(32768)).mean(axis=1, dtype=np.float32)
    spec = torch.stft(torch.from_numpy(mono), 512, hop_length=160,
                      window=torch.hann_window(512), return_complex=True).abs().square()
    bank = torch.from_numpy(mel_filterbank(RATE, 512, 40, 0.0, RATE / 2).copy())
    expected = (bank @ spec).clamp_min(1e-10).log().T.contiguous().numpy()
    assert_bit_exact(result["n"], expected)


def test_mel_filterbank_shape_and_coverage() -> None:
    bank = mel_filterbank(RATE, 512, 40, 0.0, RATE / 2)
    assert bank.shape == (40, 257) and bank.dtype == np.float32
    assert (bank.max(axis=1) > 0.5).all()  # every band has a peak near 1
    assert not bank.flags.writeable


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_mlp_matches_the_model_built_directly(eco_client: AsyncClient, runtime: str) -> None:
    features = np.random.default_rng(1).standard_normal((100, 40)).astype(np.float32)
    result = await run_node(eco_client, runtime, "TorchMLP", MLP, {"in": features})
    with torch.inference_mode():
        expected = torch.softmax(build_mlp(TorchMLPParams(**MLP))(torch.from_numpy(features)),
                                 dim=-1).numpy()
    assert_bit_exact(result["n"], expected)
    np.testing.assert_allclose(result["n"].sum(axis=1), 1.0, rtol=1e-5)


async def test_mlp_seed_decides_the_weights(eco_client: AsyncClient) -> None:
    features = np.ones((2, 40), np.float64)  # float64 in: converted to float32
    a = await run_node(eco_client, "inprocess", "TorchMLP", MLP, {"in": features})
    b = await run_node(eco_client, "inprocess", "TorchMLP", {**MLP, "seed": 12},
                       {"in": features})
    again = await run_node(eco_client, "inprocess", "TorchMLP", MLP, {"in": features})
    assert_bit_exact(a["n"], again["n"])
    assert not np.array_equal(a["n"], b["n"])


async def test_mlp_pooling_and_logits(eco_client: AsyncClient) -> None:
    features = np.random.default_rng(2).standard_normal((3, 7, 40)).astype(np.float32)
    params = {**MLP, "output": "logits", "pool": "mean"}
    result = await run_node(eco_client, "inprocess", "TorchMLP", params, {"in": features})
    with torch.inference_mode():
        logits = build_mlp(TorchMLPParams(**MLP))(torch.from_numpy(features))
    assert result["n"].shape == (5,)
    np.testing.assert_allclose(result["n"], logits.reshape(-1, 5).mean(0).numpy(), rtol=1e-6)


async def test_mlp_rejects_the_wrong_width(eco_client: AsyncClient) -> None:
    with pytest.raises(NodeError, match="last dimension is 40"):
        await eco_client.execute(one_node("TorchMLP", MLP, "inprocess"),
                                 {"n": np.ones((2, 39), np.float32)})


@pytest.mark.parametrize("shape", [(1, 40), (4096, 40)])
async def test_torch_nodes_bit_exact_across_runtimes(eco_client: AsyncClient,
                                                     shape: tuple[int, int]) -> None:
    features = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
    inprocess, sandboxed = await run_both(eco_client, "TorchMLP", MLP, {"in": features})
    assert_bit_exact(inprocess["n"], sandboxed["n"])
    sound = audio(seconds=3.0)
    params = {"n_fft": 1024, "n_mels": 64, "log": True}
    inprocess, sandboxed = await run_both(eco_client, "TorchSpectrogram", params, {"in": sound})
    assert_bit_exact(inprocess["n"], sandboxed["n"])


def test_inputs_are_shared_not_copied() -> None:
    """The numpy -> torch conversion shares a read-only float32 input's memory (no copy)."""
    from tensorline.server.nodes.ecosystem.torch_nodes import to_numpy, to_torch

    data = np.arange(12, dtype=np.float32)
    data.flags.writeable = False
    tensor = to_torch(data)
    assert tensor.data_ptr() == data.ctypes.data
    back = to_numpy(tensor)
    assert back.ctypes.data == data.ctypes.data
    assert to_torch(np.arange(3, dtype=np.int16)).dtype == torch.float32  # converting copies
