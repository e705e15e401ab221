"""``tensorline stream`` against a real server: a generated WAV file and a .npy file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import yaml
from typer.testing import CliRunner

from tensorline.client import Audio
from tensorline.client.cli import app
from tensorline.client.cli._io import read_wav, write_wav

RATE = 16000


async def invoke(*args: str) -> tuple[int, str]:
    # The CLI runs its own event loop: run it off the test's loop (which serves the server).
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args))
    return result.exit_code, result.output


async def test_cli_streams_a_wav_file(target: str, tmp_path: Path) -> None:
    t = np.arange(RATE) / RATE  # 1 s tone
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    write_wav(tmp_path / "in.wav", Audio(samples, RATE))
    manifest = {"nodes": [{"id": "mic", "node_type": "PassThrough"},
                          {"id": "frames", "node_type": "AudioChunker",
                           "params": {"frame_ms": 32}}],
                "connections": [{"from": "mic", "to": "frames"}]}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(manifest))
    code, output = await invoke(
        "stream", str(tmp_path / "pipeline.yaml"), "--server", target,
        "--input", f"mic={tmp_path / 'in.wav'}", "--chunk", "20ms",
        "--output", str(tmp_path / "out.wav"))
    assert code == 0, output
    assert "50/50" in output  # 1 s in 20 ms chunks, all sent
    assert "chunks/s" in output
    out = read_wav(tmp_path / "out.wav")
    assert out.sample_rate == RATE and np.array_equal(out.samples, samples)


async def test_cli_streams_npy_rows_to_npz(target: str, tmp_path: Path) -> None:
    data = np.arange(40, dtype=np.float32).reshape(20, 2)
    np.save(tmp_path / "x.npy", data)
    manifest = {"nodes": [{"id": "x", "node_type": "Scale", "params": {"factor": 2}},
                          {"id": "batch", "node_type": "Accumulator", "params": {"count": 3}}],
                "connections": [{"from": "x", "to": "batch"}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(manifest))
    code, output = await invoke(
        "stream", str(tmp_path / "p.yaml"), "-s", target, "-i", f"x={tmp_path / 'x.npy'}",
        "--chunk", "4", "-o", str(tmp_path / "out.npz"))
    assert code == 0, output
    with np.load(tmp_path / "out.npz") as saved:
        assert np.array_equal(saved["batch"], data * 2)


async def test_cli_stream_reports_errors(target: str, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros(4, dtype=np.float32))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(
        {"nodes": [{"id": "x", "node_type": "Scael"}]}))
    code, output = await invoke("stream", str(tmp_path / "p.yaml"), "-s", target,
                                "-i", f"x={tmp_path / 'x.npy'}", "--chunk", "2")
    assert code == 1
    assert "nodes[0].node_type" in output and "did you mean 'Scale'" in output
    code, output = await invoke("stream", str(tmp_path / "p.yaml"), "-s", target,
                                "-i", f"x={tmp_path / 'x.npy'}", "--chunk", "20ms")
    assert code == 1 and "give --rate HZ (rows per second) or --chunk N (rows)" in output
