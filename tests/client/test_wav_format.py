"""The client's WAV module (no scipy in a client-only install) agrees with scipy.io.wavfile:
files it writes are byte for byte scipy's, and every file reads to the same array and dtype."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

from tensorline.client import _wav as wav
from tensorline.client.cli._io import read_wav, write_wav
from tensorline.wire._values import Audio

RNG = np.random.default_rng(7)


def samples(dtype: str, channels: int, frames: int = 101) -> np.ndarray:
    shape = (frames,) if channels == 1 else (frames, channels)
    if dtype.startswith("float"):
        return RNG.uniform(-1, 1, shape).astype(dtype)
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("dtype", wav.WRITABLE)
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_writes_what_scipy_writes_and_reads_what_scipy_reads(tmp_path: Path, dtype: str,
                                                             channels: int) -> None:
    data = samples(dtype, channels)
    ours, theirs = tmp_path / "ours.wav", tmp_path / "theirs.wav"
    wav.write(ours, 44100, data)
    wavfile.write(theirs, 44100, data)
    assert ours.read_bytes() == theirs.read_bytes()
    rate, read = wav.read(theirs)
    assert rate == 44100
    assert read.dtype == data.dtype and read.shape == data.shape
    np.testing.assert_array_equal(read, data)


def pcm_file(path: Path, width: int, channels: int, frames: bytes, *, extensible: bool = False,
             extra: bytes = b"") -> None:
    """A PCM WAV file made by hand (scipy.io.wavfile writes no 24-bit or extensible files)."""
    block = width * channels
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else 1, channels, 8000, 8000 * block,
                      block, width * 8)
    if extensible:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt += struct.pack("<HHI", 22, width * 8, 0) + struct.pack("<H", 1) + guid_tail
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra
            + b"data" + struct.pack("<I", len(frames)) + frames)
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


@pytest.mark.parametrize("extensible", [False, True])
@pytest.mark.parametrize("channels", [1, 2])
def test_24_bit_and_extensible_pcm_read_as_scipy_reads_them(tmp_path: Path, extensible: bool,
                                                            channels: int) -> None:
    path = tmp_path / "a.wav"
    frames = RNG.integers(0, 256, 3 * channels * 50, dtype=np.uint8).tobytes()
    # A LIST chunk of odd size (padded) before the data: metadata, skipped.
    pcm_file(path, 3, channels, frames, extensible=extensible,
             extra=b"LIST" + struct.pack("<I", 5) + b"INFOx\x00")
    rate, ours = wav.read(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wavfile.WavFileWarning)  # the LIST chunk it skips
        their_rate, theirs = wavfile.read(path)
    assert rate == their_rate == 8000
    assert ours.dtype == theirs.dtype == np.int32
    np.testing.assert_array_equal(ours, theirs)
    # Left-justified: full scale stays full scale.
    assert int(np.abs(ours).max()) > 2**30


@pytest.mark.parametrize(("content", "message"), [
    (b"", "not a RIFF/WAVE file"),
    (b"RIFX\x00\x00\x00\x00WAVE", "RIFX files are not supported"),
    (b"RIFF\x04\x00\x00\x00WAVE", "no fmt chunk"),
    (b"RIFF\x00\x00\x00\x00WAVEfmt \x10\x00\x00\x00" + struct.pack("<HHIIHH", 2, 1, 8000, 0, 1, 4),
     "unsupported WAV format 0x0002"),
    (b"RIFF\x00\x00\x00\x00WAVEfmt \x10\x00\x00\x00" + struct.pack("<HHIIHH", 1, 1, 8000, 0, 2, 16),
     "no data chunk"),
    (b"RIFF\x00\x00\x00\x00WAVEfmt \x10\x00\x00\x00" + struct.pack("<HHIIHH", 1, 1, 8000, 0, 2, 16)
     + b"data\x10\x00\x00\x00\x00\x00", "truncated data chunk"),
])
def test_bad_files_are_one_clear_value_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"bad.wav: cannot read this WAV file: {message}"):
        read_wav(path)


def test_cli_round_trip_keeps_dtype_and_rate(tmp_path: Path) -> None:
    path = tmp_path / "x.wav"
    write_wav(path, Audio(np.arange(-8, 8, dtype=np.float16), 22050))  # widened to float32
    audio = read_wav(path)
    assert audio.sample_rate == 22050 and audio.samples.dtype == np.float32
    np.testing.assert_array_equal(audio.samples, np.arange(-8, 8, dtype=np.float32))
    with pytest.raises(ValueError, match="cannot write int8 audio"):
        write_wav(path, Audio(np.zeros(4, dtype=np.int8), 8000))
