"""`tensorline serve` exits after its grace period even while a sync node ignores cancellation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tensorline.client import Client, DeadlineExceededError

REPO = Path(__file__).resolve().parents[3]

STUCK_NODE = '''
"""A node that sleeps without ever looking at its cancellation flag."""
import time
from tensorline.server.nodes import Node

class Stuck(Node):
    def process(self, inputs):
        time.sleep(3600)
        return inputs["in"]
'''


def test_serve_exits_past_a_stuck_sync_node(tmp_path: Path) -> None:
    (tmp_path / "stuck_nodes.py").write_text(STUCK_NODE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}",
           "TENSORLINE_LOAD_ENTRY_POINTS": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from tensorline.client.cli import main; main()", "serve",
         "--host", "127.0.0.1", "--port", "0", "--grace", "1", "--node-module", "stuck_nodes"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        port = None
        for line in proc.stdout:
            if "listening on" in line:
                port = int(line.split("listening on 127.0.0.1:")[1].split()[0])
                break
        assert port, "server did not start"
        with Client(f"127.0.0.1:{port}") as client, pytest.raises(DeadlineExceededError):
            client.execute({"nodes": [{"id": "s", "node_type": "Stuck"}]},
                           {"s": np.ones(1)}, timeout=0.5)
        proc.send_signal(signal.SIGTERM)
        # Exits (code 0) instead of waiting out the hour-long sleep.
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
