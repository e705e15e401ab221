"""The CLI's file formats: WAV in/out, input files by suffix, npz and directory outputs."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest

from tensorline.client import Audio, Json, Tagged
from tensorline.client.cli._io import (
    describe,
    parse_assignment,
    read_input,
    read_wav,
    write_outputs,
    write_wav,
)


def make_wav(path: Path, frames: bytes, width: int, channels: int, rate: int) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(frames)


def test_stereo_wav_round_trip(tmp_path: Path) -> None:
    stereo = np.array([[1, -1], [1000, -1000], [32767, -32768]], dtype="<i2")
    path = tmp_path / "stereo.wav"
    write_wav(path, Audio(stereo, 22050))
    audio = read_wav(path)
    assert audio.sample_rate == 22050
    assert audio.samples.dtype == np.int16
    np.testing.assert_array_equal(audio.samples, stereo)


def test_float_audio_is_written_as_clipped_pcm16(tmp_path: Path) -> None:
    path = tmp_path / "float.wav"
    write_wav(path, Audio(np.array([0.0, 0.5, 2.0, -2.0], dtype=np.float32), 8000))
    audio = read_wav(path)
    np.testing.assert_array_equal(audio.samples, [0, 16383, 32767, -32767])


def test_24_bit_wav_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "24.wav"
    make_wav(path, b"\x00" * 6, 3, 1, 8000)
    with pytest.raises(ValueError, match="24-bit WAV is not supported"):
        read_wav(path)


def test_inputs_by_suffix(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.arange(3))
    (tmp_path / "b.json").write_text('{"n": 1}')
    (tmp_path / "c.txt").write_text("hi")
    (tmp_path / "d.bin").write_bytes(b"\x00\x01")
    np.testing.assert_array_equal(read_input(tmp_path / "a.npy"), np.arange(3))
    assert read_input(tmp_path / "b.json") == Json({"n": 1})
    assert read_input(tmp_path / "c.txt") == "hi"
    assert read_input(tmp_path / "d.bin") == b"\x00\x01"


@pytest.mark.parametrize("text", ["x", "=file", "node=", ""])
def test_bad_assignments(text: str) -> None:
    with pytest.raises(ValueError, match="expected NODE"):
        parse_assignment(text)


def test_assignment_with_port() -> None:
    assert parse_assignment("node:port=a=b.npy") == ("node:port", Path("a=b.npy"))


def test_describe_every_kind() -> None:
    assert describe(np.zeros((2, 3), dtype=np.float32)) == "tensor float32 [2, 3]"
    assert describe(Audio(np.zeros(8000, dtype=np.int16), 16000)) == (
        "audio int16 [8000] @ 16000 Hz (0.500 s)")
    assert describe(Json([1])) == "json [1]"
    assert describe("hello") == "text 'hello'"
    assert describe(b"abc") == "binary 3 bytes"
    assert describe(Tagged("x", {"k": "v"})) == "text 'x' metadata={'k': 'v'}"


def test_write_outputs_npz_and_directory(tmp_path: Path) -> None:
    outputs = {"t": Tagged(np.arange(2), {"k": "v"}), "j": Json({"a": 1}), "s": "text",
               "b": b"\x01\x02", "a:out": Audio(np.zeros(4, dtype=np.int16), 8000)}
    write_outputs(tmp_path / "out.npz", outputs)
    with np.load(tmp_path / "out.npz") as saved:
        np.testing.assert_array_equal(saved["t"], [0, 1])
        assert json.loads(str(saved["j"])) == {"a": 1}
        assert str(saved["s"]) == "text"
        np.testing.assert_array_equal(saved["b"], [1, 2])
        assert int(saved["a:out.sample_rate"]) == 8000
    folder = tmp_path / "dir"
    write_outputs(folder, outputs)
    assert sorted(p.name for p in folder.iterdir()) == [
        "a_out.wav", "b.bin", "j.json", "s.txt", "t.npy"]
