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


@pytest.mark.parametrize("dtype", ["uint8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("channels", [1, 2])
def test_wav_round_trip_keeps_the_dtype(tmp_path: Path, dtype: str, channels: int) -> None:
    rng = np.random.default_rng(0)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        samples = rng.integers(info.min, info.max, size=(50, channels), endpoint=True, dtype=dtype)
    else:
        samples = rng.uniform(-1.5, 1.5, size=(50, channels)).astype(dtype)  # no clipping
    samples = samples[:, 0] if channels == 1 else samples
    path = tmp_path / "x.wav"
    write_wav(path, Audio(samples, 44100))
    audio = read_wav(path)
    assert audio.sample_rate == 44100
    assert audio.samples.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(audio.samples, samples)


def test_float16_audio_is_written_as_float32(tmp_path: Path) -> None:
    path = tmp_path / "half.wav"
    write_wav(path, Audio(np.array([0.0, 0.5, -2.0], dtype=np.float16), 8000))
    audio = read_wav(path)
    assert audio.samples.dtype == np.float32
    np.testing.assert_array_equal(audio.samples, [0.0, 0.5, -2.0])


def test_unwritable_audio_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot write int8 audio .* save it as \.npz"):
        write_wav(tmp_path / "x.wav", Audio(np.zeros(4, dtype=np.int8), 8000))


def test_24_bit_wav_is_read_as_int32(tmp_path: Path) -> None:
    path = tmp_path / "24.wav"
    # Two little-endian 24-bit samples: 1 and -1.
    make_wav(path, b"\x01\x00\x00\xff\xff\xff", 3, 1, 8000)
    audio = read_wav(path)
    assert audio.samples.dtype == np.int32
    np.testing.assert_array_equal(audio.samples, [1 << 8, -(1 << 8)])


def test_a_file_that_is_not_wav_names_itself(tmp_path: Path) -> None:
    path = tmp_path / "fake.wav"
    path.write_bytes(b"not a riff file at all")
    with pytest.raises(ValueError, match=f"{path}: cannot read this WAV file"):
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
