"""Write a test clip for the audio scoring example: 16-bit PCM WAV at 44.1 kHz, a tone, a chirp
and a noise burst (deterministic; numpy + the standard library only).

    python examples/audio_scoring/make_clip.py clip.wav [--seconds 2.0]
"""

from __future__ import annotations

import argparse
import wave
from pathlib import Path

import numpy as np

RATE = 44100


def make_clip(seconds: float = 2.0, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """Mono int16 samples: 440 Hz tone, then a 200 -> 6000 Hz chirp, then noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    third = t.size // 3
    clip = np.zeros(t.size)
    clip[:third] = 0.5 * np.sin(2 * np.pi * 440 * t[:third])
    tc = t[third:2 * third] - t[third]
    sweep = 200 + (6000 - 200) * tc / max(tc[-1], 1e-9)
    clip[third:2 * third] = 0.4 * np.sin(2 * np.pi * np.cumsum(sweep) / rate)
    clip[2 * third:] = 0.3 * rng.standard_normal(t.size - 2 * third)
    return np.round(np.clip(clip, -1, 1) * 32767).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.astype("<i2").tobytes())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    write_wav(args.path, make_clip(args.seconds))
    print(f"wrote {args.path} ({args.seconds} s, {RATE} Hz, int16 mono)")
