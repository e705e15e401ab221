"""WAV files as numpy arrays, without scipy: the client installs light (scipy is a server
dependency), and the CLI still reads and writes audio.

The formats and dtypes are scipy.io.wavfile's, so a file reads the same either way, and a file
this module writes is byte for byte the one ``scipy.io.wavfile.write`` writes (tests compare
both): PCM of 8 bits (uint8, unsigned as WAV stores it), 16, 32 and 64 bits (int16, int32,
int64); 24-bit PCM (and other whole-byte depths without a numpy type) read left-justified into
the next wider integer (int32 for 24-bit), so full scale stays full scale; IEEE float of 32 and
64 bits (float32, float64). ``WAVE_FORMAT_EXTENSIBLE`` headers are read through their sub-format.
Big-endian (RIFX), RF64 and compressed files are refused with a ValueError naming what they are.
One channel reads as a 1-D array, several as ``(frames, channels)``.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt

PCM = 0x0001
IEEE_FLOAT = 0x0003
EXTENSIBLE = 0xFFFE
# The dtypes a WAV file is written from (scipy.io.wavfile.write's list).
WRITABLE = ("uint8", "int16", "int32", "int64", "float32", "float64")
_FORMATS = {PCM: "PCM", IEEE_FLOAT: "IEEE float", EXTENSIBLE: "extensible"}


def read(path: Path) -> tuple[int, npt.NDArray[np.generic]]:
    """``(sample rate, samples)`` of a WAV file. ValueError says what is wrong with it."""
    data = path.read_bytes()
    if data[:4] in (b"RIFX", b"RF64"):
        raise ValueError(f"{data[:4].decode()} files are not supported (little-endian RIFF only)")
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    fmt: tuple[int, int, int, int, int] | None = None
    offset = 12
    while offset + 8 <= len(data):
        chunk_id, size = data[offset:offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        body = data[offset + 8:offset + 8 + size]
        if chunk_id == b"fmt ":
            fmt = _format(body)
        elif chunk_id == b"data":
            if fmt is None:
                raise ValueError("the data chunk comes before the fmt chunk")
            return fmt[2], _samples(body, size, *fmt[:2], *fmt[3:])
        # Any other chunk (LIST, fact, cue, ...) is metadata; chunks are padded to even sizes.
        offset += 8 + size + (size & 1)
    raise ValueError("no fmt chunk" if fmt is None else "no data chunk")


def _format(body: bytes) -> tuple[int, int, int, int, int]:
    """(format tag, channels, sample rate, block align, bits per sample) of a fmt chunk."""
    if len(body) < 16:
        raise ValueError("truncated fmt chunk")
    tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", body)
    if tag == EXTENSIBLE:
        if len(body) < 26:
            raise ValueError("truncated WAVE_FORMAT_EXTENSIBLE fmt chunk")
        tag = struct.unpack_from("<H", body, 24)[0]  # the sub-format GUID starts with the tag
    if tag not in (PCM, IEEE_FLOAT):
        raise ValueError(f"unsupported WAV format 0x{tag:04x} (only PCM and IEEE float)")
    if channels < 1 or block_align < channels or block_align % channels:
        raise ValueError(f"inconsistent fmt chunk: {channels} channel(s), block align {block_align}")
    return tag, channels, rate, block_align, bits


def _samples(body: bytes, size: int, tag: int, channels: int, block_align: int,
             bits: int) -> npt.NDArray[np.generic]:
    if len(body) < size:
        raise ValueError(f"truncated data chunk: {len(body)} of {size} bytes")
    width = block_align // channels  # bytes per sample, as stored (may exceed bits / 8)
    usable = len(body) - len(body) % block_align
    raw = np.frombuffer(body, dtype=np.uint8, count=usable)
    samples: npt.NDArray[np.generic]
    if tag == IEEE_FLOAT:
        if width not in (4, 8):
            raise ValueError(f"unsupported IEEE float WAV of {width * 8} bits (32 or 64)")
        samples = raw.view(f"<f{width}")
    elif width == 1:
        samples = raw  # 8-bit WAV is unsigned
    elif width in (2, 4, 8):
        samples = raw.view(f"<i{width}")
    elif width <= 8:
        # 24-bit and other depths without a numpy type: the bytes go to the top of the next
        # wider integer (left-justified), so full scale stays full scale.
        wide = 4 if width < 4 else 8
        padded = np.zeros((usable // width, wide), dtype=np.uint8)
        padded[:, wide - width:] = raw.reshape(-1, width)
        samples = padded.view(f"<i{wide}").reshape(-1)
    else:
        raise ValueError(f"unsupported PCM WAV of {bits} bits")
    samples = samples.astype(samples.dtype.newbyteorder("="), copy=False)
    return samples if channels == 1 else samples.reshape(-1, channels)


def write(path: Path, rate: int, samples: npt.NDArray[np.generic]) -> None:
    """Write ``samples`` (frames, or frames x channels; a dtype of ``WRITABLE``) as a WAV
    file: PCM for integers, IEEE float (with a fact chunk) for floats."""
    if samples.dtype.name not in WRITABLE or samples.ndim not in (1, 2):
        raise ValueError(f"cannot write {samples.dtype} samples of shape {list(samples.shape)}")
    is_float = samples.dtype.kind == "f"
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    width = samples.dtype.itemsize
    fmt = struct.pack("<HHIIHH", IEEE_FLOAT if is_float else PCM, channels, rate,
                      rate * width * channels, width * channels, width * 8)
    if is_float:
        fmt += b"\x00\x00"  # cbSize: non-PCM formats carry it
    header = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    if is_float:
        header += b"fact" + struct.pack("<II", 4, samples.shape[0])
    body = np.ascontiguousarray(samples, dtype=samples.dtype.newbyteorder("<")).tobytes()
    if 4 + len(header) + 8 + len(body) > 0xFFFFFFFF:
        raise ValueError("too large for a WAV file (4 GiB)")
    with path.open("wb") as out:
        out.write(b"RIFF" + struct.pack("<I", len(header) + 8 + len(body)) + header)
        out.write(b"data" + struct.pack("<I", len(body)))
        out.write(body)
