"""The audio scoring example (examples/audio_scoring) through a real server: the YAML manifest
as shipped, a generated clip, via the Python client and via the ``tensorline run`` CLI; the
scores agree with the same chain computed directly and are bit-identical across runtimes."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tensorline.client import AsyncClient, Audio, load_manifest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "audio_scoring"
ECOSYSTEM = "tensorline.server.nodes.ecosystem"


def make_clip_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_clip", EXAMPLE / "make_clip.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def direct_scores(samples: np.ndarray, rate: int, manifest: dict[str, Any]) -> np.ndarray:
    """The pipeline's chain computed with scipy/torch directly (no server)."""
    from scipy.signal import butter, resample_poly, sosfilt

    from tensorline.server.nodes.ecosystem.torch_nodes import (
        TorchMLPParams,
        build_mlp,
        mel_filterbank,
    )

    params = {node["id"]: node["params"] for node in manifest["nodes"]}
    target = params["mic"]["target_rate"]
    x = resample_poly(samples.astype(np.float64), target // 100, rate // 100)
    x = np.clip(np.rint(x), -32768, 32767)
    sos = butter(params["lowpass"]["order"], params["lowpass"]["cutoff_hz"], fs=target,
                 output="sos")
    x = np.clip(np.rint(sosfilt(sos, x)), -32768, 32767).astype(np.int16)
    mono = torch.from_numpy(x.astype(np.float32) / np.float32(32768))
    feats = params["features"]
    spec = torch.stft(mono, feats["n_fft"], hop_length=feats["hop_length"],
                      window=torch.hann_window(feats["n_fft"]), return_complex=True)
    bank = mel_filterbank(target, feats["n_fft"], feats["n_mels"], 0.0, target / 2)
    logmel = (torch.from_numpy(bank.copy()) @ spec.abs().square()).clamp_min(1e-10).log().T
    with torch.inference_mode():
        logits = build_mlp(TorchMLPParams(**params["scores"]))(logmel.contiguous())
        return torch.softmax(logits.mean(dim=0), dim=-1).numpy()


async def test_example_pipeline_scores(server_factory: Callable[..., Any]) -> None:
    manifest = load_manifest(EXAMPLE / "pipeline.yaml")
    clip = make_clip_module().make_clip(seconds=1.5)
    results = {}
    for runtime in ("inprocess", "sandbox"):
        server = await server_factory(node_modules=[ECOSYSTEM], runtime=runtime)
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=120) as client:
            results[runtime] = await client.execute(manifest, {"mic": Audio(clip, 44100)})
    inprocess = results["inprocess"]
    scores = inprocess["scores"]
    assert scores.shape == (4,) and scores.dtype == np.float32
    assert abs(float(scores.sum()) - 1.0) < 1e-5
    np.testing.assert_allclose(scores, direct_scores(clip, 44100, manifest), rtol=1e-5, atol=1e-7)
    assert [m.node_id for m in inprocess.metrics.nodes] == ["mic", "lowpass", "features",
                                                            "scores"]
    sandboxed = results["sandbox"]
    if all(m.runtime == "sandbox" for m in sandboxed.metrics.nodes):
        assert sandboxed["scores"].tobytes() == scores.tobytes()
    else:  # a server without the sandbox runtime degrades the override to in-process
        assert all("sandbox unavailable" in m.selection_reason or m.runtime == "sandbox"
                   for m in sandboxed.metrics.nodes)


async def test_example_runs_with_the_cli(server_factory: Callable[..., Any],
                                         tmp_path: Path) -> None:
    server = await server_factory(node_modules=[ECOSYSTEM])
    clip_module = make_clip_module()
    clip = clip_module.make_clip(seconds=1.0)
    wav, out = tmp_path / "clip.wav", tmp_path / "scores.npz"
    clip_module.write_wav(wav, clip)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from tensorline.client.cli import main; main()", "run",
        str(EXAMPLE / "pipeline.yaml"),
        "-s", f"127.0.0.1:{server.port}", "-i", f"mic={wav}", "-o", str(out), "--timeout", "120",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"})  # rich wraps tables to the terminal width
    stdout, _ = await process.communicate()
    text = stdout.decode()
    assert process.returncode == 0, text
    assert "scores" in text and "TorchMLP" in text
    scores = np.load(out)["scores"]
    np.testing.assert_allclose(scores, direct_scores(clip, 44100, load_manifest(
        EXAMPLE / "pipeline.yaml")), rtol=1e-5, atol=1e-7)
