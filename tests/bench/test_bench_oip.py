"""bench/bench_oip.py's tensorline side, end to end in a few seconds: ``--only tensorline``
starts ``tensorline serve --pipelines`` with the bench's identity and scale manifests, waits for
ServerReady/ModelReady through tritonclient, checks both models' answers bit-exact and takes a
token measurement. The figures file has every size and model, and the run leaves no server
process and no temp dir behind. (MLServer itself never runs in CI: it needs its own virtualenv,
a minute to install.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_oip.py"


def test_the_tensorline_side_runs_and_cleans_up(tmp_path: Path) -> None:
    figures_file = tmp_path / "figures.json"
    # The bench's temp dir (manifests, server log) goes under tmp_path, so leftovers show.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(BENCH), "--only", "tensorline", "--quick", "--rounds", "1",
         "--json", str(figures_file)],
        env=env, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    figures = json.loads(figures_file.read_text())
    assert set(figures["latency"]) == {"1 KiB", "1 MiB"}
    for size in figures["latency"].values():
        for model in ("identity", "scale"):
            assert size[model]["tensorline_p50_ms"] > 0
    for model in ("identity", "scale"):
        assert figures["throughput"][model]["tensorline_calls_s"] > 0
    assert [path.name for path in tmp_path.iterdir()] == ["figures.json"]
    survivors = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
                 if any(str(tmp_path) in part for part in p.info["cmdline"] or ())]
    assert survivors == []
