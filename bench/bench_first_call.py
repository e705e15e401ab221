"""The demo pipeline's first call against its second, on fresh servers with preload off and on.

Each round starts a fresh ``tensorline serve`` process, waits (polling gRPC health) until it is
SERVING, which also connects the client's channel, then times the demo pipeline's first and
second ExecutePipeline calls and stops the server. Rounds alternate (off, on, off, on, ...) so
drift on a noisy machine hits both alike; the report gives medians over the rounds and the
ratio first / second.

    python bench/bench_first_call.py             # 5 rounds each
    python bench/bench_first_call.py --rounds 9

"on" is what ``tensorline demo`` runs: TENSORLINE_PRELOAD_MODULES=scipy.signal and the built-in
nodes, and TENSORLINE_WARMUP_NODES=* (every node type that declares warm-up inputs, among them
AudioResample and ButterLowpass). "off" is a plain server. Also reported: the time from starting
the process to SERVING, where preloading and warm-up move the cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
from _common import run_and_save

from tensorline.client import AsyncClient, Audio
from tensorline.client.cli._app import DEMO_MANIFEST, DEMO_PRELOAD

MODES = {
    "off": {},
    "on": {"TENSORLINE_PRELOAD_MODULES": ",".join(DEMO_PRELOAD), "TENSORLINE_WARMUP_NODES": "*"},
}


def demo_inputs() -> dict[str, Any]:
    """The inputs ``tensorline demo`` sends: a second of 48 kHz int16 tone and a 3x4 tensor."""
    t = np.arange(48000) / 48000
    tone = (np.sin(2 * np.pi * 440 * t) * 10000).astype(np.int16)
    return {"mic": Audio(tone, 48000),
            "features": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)}


async def one_round(mode: str) -> dict[str, float]:
    """A fresh server in ``mode``: seconds to SERVING, and the first and second call in ms."""
    env = {**os.environ, "TENSORLINE_LOG_LEVEL": "WARNING", **MODES[mode]}
    for name in ("TENSORLINE_PRELOAD_MODULES", "TENSORLINE_WARMUP_NODES"):
        if name not in MODES[mode]:
            env.pop(name, None)
    started = time.perf_counter()
    process = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-c", "from tensorline.client.cli import main; main()", "serve",
         "--host", "127.0.0.1", "--port", "0"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    try:
        assert process.stdout is not None
        line = await asyncio.to_thread(process.stdout.readline)  # "tensorline listening on h:p"
        if "listening on" not in line:
            raise RuntimeError(f"the server did not start: {line!r}")
        port = int(line.split("listening on ", 1)[1].split()[0].rsplit(":", 1)[1])
        inputs = demo_inputs()
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            # Polling a real condition in another process (its warm-up is over): no event here.
            while await client.health() != "SERVING":  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            serving_s = time.perf_counter() - started
            calls = []
            for _ in range(2):
                began = time.perf_counter()
                await client.execute(DEMO_MANIFEST, inputs)
                calls.append((time.perf_counter() - began) * 1000)
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 30)
    return {"serving_s": serving_s, "first_ms": calls[0], "second_ms": calls[1]}


async def main(arguments: argparse.Namespace) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for index in range(arguments.rounds):
        for mode in MODES:
            result = await one_round(mode)
            rounds[mode].append(result)
            print(f"round {index + 1} preload {mode:>3}: SERVING after {result['serving_s']:.2f} s, "
                  f"first {result['first_ms']:7.1f} ms, second {result['second_ms']:5.1f} ms",
                  flush=True)
    figures: dict[str, Any] = {"rounds": rounds}
    print(f"\nmedians over {arguments.rounds} fresh servers each:")
    print("| preload + warm-up | to SERVING | first call | second call | first / second |")
    print("| --- | --- | --- | --- | --- |")
    for mode, results in rounds.items():
        median = {key: statistics.median(r[key] for r in results)
                  for key in ("serving_s", "first_ms", "second_ms")}
        # The ratio of each round, then its median: a round's two calls share its conditions.
        ratio = statistics.median(r["first_ms"] / r["second_ms"] for r in results)
        figures[mode] = {**median, "ratio": ratio}
        print(f"| {mode} | {median['serving_s']:.2f} s | {median['first_ms']:.1f} ms | "
              f"{median['second_ms']:.1f} ms | **{ratio:.2f}x** |")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="fresh servers per mode")
    run_and_save(main, parser)
