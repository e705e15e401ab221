"""Reading inputs from files and writing outputs for the CLI.

Inputs: ``.npy`` -> tensor, ``.wav`` -> audio, ``.json`` -> JSON, ``.txt`` -> text, anything
else -> bytes. WAV goes through ``tensorline.client._wav`` both ways (scipy.io.wavfile's formats
and dtypes, without scipy) and keeps the sample dtype: 8-bit (uint8), 16- and 32-bit PCM (int16,
int32) and IEEE float (float32, float64); 24-bit PCM is read as int32 (left-justified, so full
scale stays full scale). Outputs: ``.npz`` (tensors as arrays, audio as
``<key>`` + ``<key>.sample_rate``, text/JSON as string arrays) or a directory (one file each).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tensorline.client import _wav as wav
from tensorline.wire import Audio, Json, Tagged

# float16 is widened to float32 without loss: WAV has no 16-bit float format.
_WIDENED = {"float16": np.dtype("float32")}


def read_wav(path: Path) -> Audio:
    try:
        rate, samples = wav.read(path)
    except ValueError as exc:  # not RIFF/WAVE, a truncated header, an unknown format
        raise ValueError(f"{path}: cannot read this WAV file: {exc}") from None
    return Audio(np.ascontiguousarray(samples), int(rate))


def write_wav(path: Path, audio: Audio) -> None:
    samples = np.asarray(audio.samples)
    samples = samples.astype(_WIDENED.get(samples.dtype.name, samples.dtype), copy=False)
    if samples.dtype.name not in wav.WRITABLE or samples.ndim > 2:
        raise ValueError(f"{path}: cannot write {samples.dtype} audio of shape "
                         f"{list(samples.shape)} as WAV (dtypes: {', '.join(wav.WRITABLE)}; "
                         "frames or frames x channels); save it as .npz instead")
    wav.write(path, audio.sample_rate, samples)


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


# Tensors up to this many elements print (and go into ``run --json``) in full; bigger ones as
# numpy summarizes them (the first and last EDGE_ITEMS per axis), and without values in JSON.
FULL_ELEMENTS = 1000
EDGE_ITEMS = 3


def render_values(value: Any, width: int = 72) -> str | None:
    """A tensor's (or audio's samples') values numpy-style, summarized beyond FULL_ELEMENTS
    elements (``[0. 1. ... 9.]``); None for other kinds (``describe`` shows them whole)."""
    if isinstance(value, Tagged):
        value = value.value
    if isinstance(value, Audio):
        value = value.samples
    if not isinstance(value, np.ndarray):
        return None
    return np.array2string(value, threshold=FULL_ELEMENTS, edgeitems=EDGE_ITEMS,
                           max_line_width=max(20, width), separator=" ")


def _plain(array: np.ndarray) -> Any:
    """``array.tolist()`` with NaN and infinities as strings: JSON has no such numbers."""
    values = array.tolist()
    if array.dtype.kind not in "fc" or bool(np.isfinite(array).all()):
        return values

    def fix(v: Any) -> Any:
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, complex):
            return str(v)
        return v if np.isfinite(v) else str(v)

    return fix(values)


def value_json(value: Any) -> dict[str, Any]:
    """One output for ``run --json``: its kind, dtype and shape (tensor, audio), the values of
    a tensor up to FULL_ELEMENTS elements (else ``"values": null, "truncated": true``), the value
    of JSON and text, the size of bytes, and the metadata of a tagged value."""
    if isinstance(value, Tagged):
        return {**value_json(value.value), "metadata": dict(value.metadata)}
    if isinstance(value, Audio | np.ndarray):
        array = np.asarray(value.samples if isinstance(value, Audio) else value)
        small = array.size <= FULL_ELEMENTS
        entry: dict[str, Any] = {"kind": "audio" if isinstance(value, Audio) else "tensor",
                                 "dtype": str(array.dtype), "shape": list(array.shape)}
        if isinstance(value, Audio):
            entry["sample_rate"] = value.sample_rate
        entry["values"] = _plain(array) if small else None
        if not small:
            entry["truncated"] = True
        return entry
    if isinstance(value, Json):
        return {"kind": "json", "value": value.value}
    if isinstance(value, str):
        return {"kind": "text", "value": value}
    return {"kind": "binary", "size": len(value)}


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
