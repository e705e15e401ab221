"""WAV files of every common sample format through the real CLI and a real server: ``run`` and
``stream`` read PCM (8/16/32-bit) and IEEE float (32/64-bit) WAV and write it back in the same
format. Files are made and checked with scipy.io.wavfile directly, not with the CLI's helpers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from scipy.io import wavfile
from typer.testing import CliRunner

from tensorline.client.cli import app

RATE = 22050


async def cli(*args: str) -> Any:
    # The CLI runs its own event loop: run it off the test's loop (which serves the server).
    runner = CliRunner(env={"COLUMNS": "200"})
    return await asyncio.to_thread(runner.invoke, app, list(args))


def samples(dtype: str, channels: int = 1) -> np.ndarray:
    t = np.arange(2205) / RATE
    x = 0.8 * np.sin(2 * np.pi * 440 * t)
    if channels > 1:
        x = np.stack([x, -x], axis=1)
    if dtype == "uint8":
        return np.round(128 + 127 * x).astype(np.uint8)
    if np.issubdtype(np.dtype(dtype), np.integer):
        return np.round(x * np.iinfo(dtype).max).astype(dtype)
    return x.astype(dtype)


@pytest.fixture
def passthrough(tmp_path: Path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"nodes": [{"id": "mic", "node_type": "PassThrough"}]}))
    return path


@pytest.mark.parametrize(("dtype", "channels"), [
    ("uint8", 1), ("int16", 2), ("int32", 1), ("float32", 1), ("float64", 2)])
async def test_run_reads_and_writes_wav_keeping_the_format(
        target: str, tmp_path: Path, passthrough: Path, dtype: str, channels: int) -> None:
    source = samples(dtype, channels)
    wavfile.write(tmp_path / "in.wav", RATE, source)
    result = await cli("run", str(passthrough), "-s", target, "-i", f"mic={tmp_path / 'in.wav'}",
                       "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert f"audio {dtype} {list(source.shape)} @ {RATE} Hz" in result.stdout
    rate, written = wavfile.read(tmp_path / "out" / "mic.wav")
    assert rate == RATE
    assert written.dtype == source.dtype
    np.testing.assert_array_equal(written, source)


async def test_stream_float_wav_to_a_float_wav(target: str, tmp_path: Path,
                                               passthrough: Path) -> None:
    source = samples("float32", 2)
    wavfile.write(tmp_path / "in.wav", RATE, source)
    result = await cli("stream", str(passthrough), "-s", target,
                       "-i", f"mic={tmp_path / 'in.wav'}", "--chunk", "20ms",
                       "-o", str(tmp_path / "out.wav"))
    assert result.exit_code == 0, result.output
    rate, written = wavfile.read(tmp_path / "out.wav")
    assert (rate, written.dtype) == (RATE, np.float32)
    np.testing.assert_array_equal(written, source)


async def test_a_file_that_is_not_wav_is_one_line(target: str, tmp_path: Path,
                                                  passthrough: Path) -> None:
    (tmp_path / "in.wav").write_bytes(b"ID3 an mp3 renamed")
    result = await cli("run", str(passthrough), "-s", target, "-i", f"mic={tmp_path / 'in.wav'}")
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {tmp_path / 'in.wav'}: cannot read this WAV file")
