"""Print the compatibility matrix of docs/compatibility.md: each probe of tests/nodes/compat.py
run through a real server in-process and sandboxed, as a Markdown table.

    PYTHONPATH=. python bench/compat_matrix.py

The server runs in this process on an ephemeral loopback port; the TCP probe connects to a
listening socket this script opens on loopback.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from tensorline.client import AsyncClient
from tensorline.server import Settings, create_server
from tests.nodes.compat import PROBES


async def matrix() -> list[tuple[str, dict[str, Any]]]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    server, server_port = await create_server(Settings(
        host="127.0.0.1", port=0, load_entry_points=False, node_modules=["tests.nodes.compat"]))
    await server.start()
    rows = []
    try:
        async with AsyncClient(f"127.0.0.1:{server_port}", timeout=60) as client:
            for what in PROBES:
                outcome: dict[str, Any] = {}
                for runtime in ("inprocess", "sandbox"):
                    manifest = {"nodes": [{"id": "p", "node_type": "Probe", "runtime_hint": runtime,
                                           "params": {"what": what, "port": port}}]}
                    result = await client.execute(manifest, {})
                    node = result.metrics.nodes[0]
                    outcome[runtime] = {**result["p"].value, "ran_in": node.runtime,
                                        "fallback": node.fallback}
                rows.append((what, outcome))
    finally:
        await server.stop(grace=1.0)
        listener.close()
    return rows


def cell(outcome: dict[str, Any], runtime: str) -> str:
    if outcome["ran_in"] != runtime:
        return f"(ran {outcome['ran_in']}) "
    return ("works: " if outcome["ok"] else "blocked: ") + outcome["detail"].replace("|", "/")


if __name__ == "__main__":
    print("| probe | in-process | sandbox |")
    print("| --- | --- | --- |")
    for what, outcome in asyncio.run(matrix()):
        print(f"| {what} | {cell(outcome['inprocess'], 'inprocess')} | "
              f"{cell(outcome['sandbox'], 'sandbox')} |")
