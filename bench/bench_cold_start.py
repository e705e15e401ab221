"""Cold start (run by hand): ``tensorline serve`` until gRPC health says SERVING, and the wall
time of ``tensorline demo``, on fresh processes.

    python bench/bench_cold_start.py [--rounds 7] [--json FILE]

Each round starts ``tensorline serve --host 127.0.0.1 --port 0`` with the default settings (the
sandbox pool of ``sandbox_workers`` workers included), reads its port from the line it prints,
polls gRPC health until SERVING and stops it; then runs ``tensorline demo`` to its end. Both are
timed from the moment the process is started; the report gives medians over the rounds. The
commands run as the installed ``tensorline`` script does (``tensorline.client.cli.main``), with
this interpreter. For a before/after in one run, see ``compare.py``.
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

from _common import run_and_save

from tensorline.client import AsyncClient

CLI = [sys.executable, "-c", "from tensorline.client.cli import main; main()"]


def environment() -> dict[str, str]:
    """This environment without the operator's TENSORLINE_* settings: the product's defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORLINE_")}
    env["TENSORLINE_LOG_LEVEL"] = "WARNING"
    return env


async def serve_to_serving() -> float:
    """Seconds from starting ``tensorline serve`` to health SERVING."""
    started = time.perf_counter()
    process = await asyncio.to_thread(
        subprocess.Popen, [*CLI, "serve", "--host", "127.0.0.1", "--port", "0"],
        env=environment(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        line = await asyncio.to_thread(process.stdout.readline)  # "tensorline listening on h:p"
        if "listening on" not in line:
            raise RuntimeError(f"the server did not start: {line!r}")
        port = int(line.split("listening on ", 1)[1].split()[0].rsplit(":", 1)[1])
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            # Polling a real condition in another process: no event to wait on here.
            while await client.health() != "SERVING":  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            return time.perf_counter() - started
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 30)


async def demo_wall() -> float:
    """Seconds ``tensorline demo`` takes, start to exit."""
    started = time.perf_counter()
    process = await asyncio.to_thread(
        subprocess.run, [*CLI, "demo"], env=environment(), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    assert process.returncode == 0
    return time.perf_counter() - started


async def main(arguments: argparse.Namespace) -> dict[str, Any]:
    serving: list[float] = []
    demo: list[float] = []
    for index in range(arguments.rounds):
        serving.append(await serve_to_serving())
        demo.append(await demo_wall())
        print(f"round {index + 1}/{arguments.rounds}: serve to SERVING {serving[-1]:.2f} s, "
              f"demo {demo[-1]:.2f} s", file=sys.stderr, flush=True)
    figures = {"serve_to_serving_s": statistics.median(serving),
               "demo_s": statistics.median(demo)}
    print(f"\nmedians over {arguments.rounds} fresh processes each:")
    print(f"tensorline serve to SERVING  {figures['serve_to_serving_s']:.2f} s  (target <= 1.0 s)")
    print(f"tensorline demo              {figures['demo_s']:.2f} s  (target <= 2.0 s)")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="fresh processes of each")
    run_and_save(main, parser)
