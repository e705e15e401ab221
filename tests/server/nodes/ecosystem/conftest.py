"""Helpers for the ecosystem node tests: a real server with the ecosystem package loaded, and
one-node runs forced into a runtime with ``runtime_hint``.

Until a server has the sandbox runtime, the selector degrades ``runtime_hint: sandbox`` for
trusted nodes to in-process and says so in the metrics; the sandbox variants then skip with that
reason instead of passing while testing the wrong runtime.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorline.client import AsyncClient, ExecuteResult
from tests.support.manifests import one_node

ECOSYSTEM = "tensorline.server.nodes.ecosystem"
RUNTIMES = ("inprocess", "sandbox")
SANDBOX_UNAVAILABLE = "sandbox unavailable"


@pytest.fixture
async def eco_client(server_factory: Callable[..., Any]) -> AsyncIterator[AsyncClient]:
    server = await server_factory(node_modules=["tests.nodes.basic", ECOSYSTEM])
    async with AsyncClient(f"127.0.0.1:{server.port}", timeout=120) as client:
        yield client

def check_runtime(result: ExecuteResult, runtime: str) -> None:
    """The node really ran in ``runtime`` (skip when this server has no sandbox), no fallback."""
    for metrics in result.metrics.nodes:
        if runtime == "sandbox" and SANDBOX_UNAVAILABLE in metrics.selection_reason:
            pytest.skip("this server has no sandbox runtime (selector: "
                        f"{metrics.selection_reason!r})")
        assert metrics.runtime == runtime, metrics
        assert metrics.fallback == "", metrics


async def run_node(client: AsyncClient, runtime: str, node_type: str,
                   params: Mapping[str, Any], inputs: Mapping[str, Any]) -> ExecuteResult:
    """Run one node ``n`` with ``runtime_hint=runtime``; ``inputs`` maps port -> value."""
    result = await client.execute(one_node(node_type, params, runtime),
                                  {f"n:{port}": value for port, value in inputs.items()})
    check_runtime(result, runtime)
    return result


async def run_both(client: AsyncClient, node_type: str, params: Mapping[str, Any],
                   inputs: Mapping[str, Any]) -> tuple[ExecuteResult, ExecuteResult]:
    """The same call in-process and sandboxed (skips when there is no sandbox)."""
    inprocess = await run_node(client, "inprocess", node_type, params, inputs)
    sandboxed = await run_node(client, "sandbox", node_type, params, inputs)
    return inprocess, sandboxed


def assert_bit_exact(a: Any, b: Any) -> None:
    """Same dtype, shape and bytes (NaNs included), not merely close."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert a.tobytes() == b.tobytes(), f"max abs difference {np.nanmax(np.abs(a - b))}"


@pytest.fixture
def model_root(tmp_path: Path) -> Path:
    """A model root (``TENSORLINE_MODEL_DIRS``) that a worker of its own uid can read: the
    files the tests write there are 0644."""
    root = tmp_path / "models"
    root.mkdir()
    root.chmod(0o755)
    return root


@pytest.fixture
async def model_client(server_factory: Callable[..., Any],
                       model_root: Path) -> AsyncIterator[AsyncClient]:
    """A server with the ecosystem nodes whose model roots are ``model_root``."""
    server = await server_factory(node_modules=["tests.nodes.basic", ECOSYSTEM],
                                  model_dirs=[str(model_root)])
    async with AsyncClient(f"127.0.0.1:{server.port}", timeout=120) as client:
        yield client


def readable(path: Path) -> Path:
    """``path`` (a file a test wrote) readable by a worker of another uid."""
    path.chmod(0o644)
    return path
