"""The compatibility matrix of docs/compatibility.md, checked on a real server: each probe of
tests/nodes/compat.py in-process and sandboxed.

A sandbox layer applies only where the kernel allows it (and the server reports which are
active in GetServerInfo), so a "blocked" expectation is asserted only when one of the layers
that block it is active; otherwise the probe must at least not crash the worker.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from tensorline.client import AsyncClient, PermissionDeniedError
from tests.server.nodes.ecosystem.conftest import check_runtime

# probe -> (works in-process, layers of which any one blocks it in the sandbox; empty = works)
MATRIX: dict[str, tuple[bool, frozenset[str]]] = {
    "tcp_connect": (True, frozenset({"seccomp", "network namespace", "landlock network"})),
    "write_outside_scratch": (True, frozenset({"landlock"})),
    "write_scratch": (True, frozenset()),
    "read_system_file": (True, frozenset()),
    "device_node": (True, frozenset({"landlock"})),
    "subprocess": (True, frozenset({"seccomp"})),
    "fork": (True, frozenset({"seccomp"})),
    # os.system never raises: checked on its own below (its status says what happened).
    "os_system": (True, frozenset()),
    "threads": (True, frozenset()),
    "shared_memory": (True, frozenset({"landlock"})),
    "scipy": (True, frozenset()),
}
OPTIONAL = {"torch_threads": "torch", "pandas": "pandas"}


@pytest.fixture
def listener() -> Iterator[int]:
    """A loopback TCP port that accepts connections (the target of the network probe)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
async def probe_client(server_factory: Callable[..., Any]) -> AsyncIterator[AsyncClient]:
    server = await server_factory(node_modules=["tests.nodes.compat"])
    async with AsyncClient(f"127.0.0.1:{server.port}", timeout=60) as client:
        yield client


async def probe(client: AsyncClient, what: str, runtime: str, port: int = 0) -> dict[str, Any]:
    manifest = {"nodes": [{"id": "p", "node_type": "Probe", "runtime_hint": runtime,
                           "params": {"what": what, "port": port}}]}
    result = await client.execute(manifest, {})
    check_runtime(result, runtime)
    outcome: dict[str, Any] = result["p"].value
    return outcome


@pytest.mark.parametrize("runtime", ["inprocess", "sandbox"])
async def test_compatibility_matrix(probe_client: AsyncClient, listener: int,
                                    runtime: str) -> None:
    info = await probe_client.server_info()
    active = {layer.name for layer in info.sandbox_layers if layer.active}
    cases = dict(MATRIX)
    for what, library in OPTIONAL.items():
        try:
            __import__(library)
        except ImportError:
            continue
        cases[what] = (True, frozenset())
    for what, (works_inprocess, blockers) in cases.items():
        outcome = await probe(probe_client, what, runtime, listener)
        if runtime == "inprocess":
            assert outcome["ok"] is works_inprocess, (what, outcome)
        elif blockers & active:
            assert outcome["ok"] is False, (what, outcome)
            assert outcome["detail"].startswith("PermissionError"), (what, outcome)
        elif not blockers:
            assert outcome["ok"] is True, (what, outcome)


async def test_os_system_returns_a_failed_status_in_the_sandbox(probe_client: AsyncClient) -> None:
    """docs/compatibility.md: os.system does not raise in the sandbox; it returns 32512 (the
    wait status of exit code 127: the shell could not be executed), 0 in-process."""
    assert (await probe(probe_client, "os_system", "inprocess"))["detail"] == "os.system returned 0"
    info = await probe_client.server_info()
    if "seccomp" not in {layer.name for layer in info.sandbox_layers if layer.active}:
        pytest.skip("seccomp is not active on this machine")
    outcome = await probe(probe_client, "os_system", "sandbox")
    assert outcome == {"ok": True, "detail": "os.system returned 32512"}


async def test_sandboxed_torch_runs_one_intra_op_thread(probe_client: AsyncClient) -> None:
    """Workers start with OMP/MKL/OpenBLAS at one thread: the pool is the parallelism."""
    pytest.importorskip("torch", reason="torch is not installed")
    outcome = await probe(probe_client, "torch_threads", "sandbox")
    assert outcome["ok"] and "intra-op threads 1," in outcome["detail"], outcome


async def test_no_gpu_in_either_runtime_here(probe_client: AsyncClient) -> None:
    """These machines have no GPU and CI installs the CPU torch wheel: both runtimes say so
    (a node that needs one declares needs_gpu and goes to the sandbox)."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible on this machine")
    for runtime in ("inprocess", "sandbox"):
        outcome = await probe(probe_client, "gpu", runtime)
        assert outcome["ok"] is False and "no CUDA device" in outcome["detail"]


async def test_a_blocked_operation_is_never_retried_in_process(
        probe_client: AsyncClient) -> None:
    """A trusted node whose operation the sandbox blocks fails with PERMISSION_DENIED naming
    it, even with fallback on (the default): running it in the server would undo the sandbox.
    This is what docs/compatibility.md and docs/runtime-selection.md promise."""
    info = await probe_client.server_info()
    if not info.sandbox_layers:
        pytest.skip("this server has no sandbox runtime")
    if not {"seccomp", "network namespace", "landlock network"} & {
            layer.name for layer in info.sandbox_layers if layer.active}:
        pytest.skip("no active layer blocks TCP connect here")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        manifest = {"nodes": [{"id": "p", "node_type": "Probe", "runtime_hint": "sandbox",
                               "params": {"what": "tcp_connect",
                                          "port": listener.getsockname()[1],
                                          "propagate": True}}]}
        with pytest.raises(PermissionDeniedError) as err:
            await probe_client.execute(manifest, {})
        assert "'p'" in str(err.value)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing connected, in the sandbox or in the server
