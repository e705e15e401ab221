"""bench/bench_unary.py end to end in a few seconds: a sandboxed node against the echo, with
``--cpu-detail``. The figures file has the latency and throughput of both servers, and each
server's CPU split by part: only tensorline has sandbox workers, both have an event loop. No
server or worker process outlives the run for long."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

from tests.support.processes import wait_until

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_unary.py"


def test_a_quick_sandboxed_run_splits_each_servers_cpu(tmp_path: Path) -> None:
    figures_file = tmp_path / "figures.json"
    before = {p.pid for p in psutil.process_iter()}
    result = subprocess.run(
        [sys.executable, str(BENCH), "--runtime", "sandbox", "--node", "Scale", "--quick",
         "--rounds", "1", "--max-bytes", "1024", "--cpu-detail", "--json", str(figures_file)],
        env={**os.environ, "TMPDIR": str(tmp_path)}, capture_output=True, text=True,
        timeout=240, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    figures = json.loads(figures_file.read_text())
    assert figures["latency"]["1 KiB"]["tl_p50_ms"] > 0
    throughput = figures["throughput"]
    assert throughput["tl_calls_s"] > 0 and throughput["echo_calls_s"] > 0
    detail = throughput["cpu_detail"]
    assert set(detail) == {"echo", "tl"}
    for part in ("event loop", "other threads", "workers", "machine idle %", "machine steal %"):
        assert part in detail["echo"] and part in detail["tl"]
    assert detail["echo"]["event loop"] > 0 and detail["tl"]["event loop"] > 0
    assert detail["echo"]["workers"] == 0
    assert detail["tl"]["workers"] > 0  # the node ran in sandbox workers, children of the server
    assert "event loop" in result.stdout
    # The bench's servers, the sandbox launcher and its workers all run this interpreter. The
    # launcher leaves when its server has gone, and its workers with it: wait for that.
    def survivors() -> list[int]:
        return [p.pid for p in psutil.process_iter()
                if p.pid not in before and _runs_this_python(p)]

    assert wait_until(lambda: not survivors(), timeout=30, what="the bench's processes to exit")


def _runs_this_python(proc: psutil.Process) -> bool:
    try:
        return proc.exe() == os.path.realpath(sys.executable)
    except psutil.Error:
        return False
