"""Reading inputs from files and writing outputs for the CLI.

Inputs: ``.npy`` -> tensor, ``.wav`` -> audio (PCM kept as its integer dtype), ``.json`` -> JSON,
``.txt`` -> text, anything else -> bytes. Outputs: ``.npz`` (tensors as arrays, audio as
``<key>`` + ``<key>.sample_rate``, text/JSON as string arrays) or a directory (one file each).
"""

from __future__ import annotations

import json
import wave
from pathlib import Path
from typing import Any

import numpy as np

from tensorline.client._values import Audio, Json, Tagged

_WAV_DTYPES: dict[int, np.dtype[Any]] = {1: np.dtype("<u1"), 2: np.dtype("<i2"), 4: np.dtype("<i4")}


def read_wav(path: Path) -> Audio:
    with wave.open(str(path), "rb") as wav:
        width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
        frames = wav.readframes(wav.getnframes())
    if width not in _WAV_DTYPES:
        raise ValueError(f"{path}: {8 * width}-bit WAV is not supported (8, 16 or 32-bit PCM)")
    samples = np.frombuffer(frames, dtype=_WAV_DTYPES[width])
    if channels > 1:
        samples = samples.reshape(-1, channels)
    return Audio(samples, rate)


def write_wav(path: Path, audio: Audio) -> None:
    samples = np.asarray(audio.samples)
    if np.issubdtype(samples.dtype, np.floating):
        samples = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    if samples.dtype.itemsize not in _WAV_DTYPES:
        samples = samples.astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1 if samples.ndim == 1 else samples.shape[1])
        wav.setsampwidth(samples.dtype.itemsize)
        wav.setframerate(audio.sample_rate)
        wav.writeframes(np.ascontiguousarray(samples).tobytes())


def read_input(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".wav":
        return read_wav(path)
    if suffix == ".json":
        return Json(json.loads(path.read_text()))
    if suffix == ".txt":
        return path.read_text()
    return path.read_bytes()


def parse_assignment(text: str) -> tuple[str, Path]:
    key, sep, file = text.partition("=")
    if not sep or not key or not file:
        raise ValueError(f"expected NODE[:PORT]=FILE, got {text!r}")
    return key, Path(file)


def describe(value: Any) -> str:
    if isinstance(value, Tagged):
        return f"{describe(value.value)} metadata={value.metadata}"
    if isinstance(value, np.ndarray):
        return f"tensor {value.dtype} {list(value.shape)}"
    if isinstance(value, Audio):
        return (f"audio {value.samples.dtype} {list(value.samples.shape)} @ "
                f"{value.sample_rate} Hz ({value.duration_s:.3f} s)")
    if isinstance(value, Json):
        return f"json {json.dumps(value.value)[:200]}"
    if isinstance(value, str):
        return f"text {value[:200]!r}"
    return f"binary {len(value)} bytes"


def write_outputs(path: Path, outputs: dict[str, Any]) -> None:
    """Write outputs to an .npz file, or one file per output into a directory."""
    if path.suffix.lower() == ".npz":
        arrays: dict[str, Any] = {}
        for key, value in outputs.items():
            if isinstance(value, Tagged):
                value = value.value
            if isinstance(value, np.ndarray):
                arrays[key] = value
            elif isinstance(value, Audio):
                arrays[key] = value.samples
                arrays[f"{key}.sample_rate"] = np.asarray(value.sample_rate)
            elif isinstance(value, Json):
                arrays[key] = np.asarray(json.dumps(value.value))
            elif isinstance(value, str):
                arrays[key] = np.asarray(value)
            else:
                arrays[key] = np.frombuffer(bytes(value), dtype=np.uint8)
        np.savez(path, **arrays)
        return
    path.mkdir(parents=True, exist_ok=True)
    for key, value in outputs.items():
        if isinstance(value, Tagged):
            value = value.value
        name = key.replace(":", "_")
        if isinstance(value, np.ndarray):
            np.save(path / f"{name}.npy", value)
        elif isinstance(value, Audio):
            write_wav(path / f"{name}.wav", value)
        elif isinstance(value, Json):
            (path / f"{name}.json").write_text(json.dumps(value.value))
        elif isinstance(value, str):
            (path / f"{name}.txt").write_text(value)
        else:
            (path / f"{name}.bin").write_bytes(bytes(value))
