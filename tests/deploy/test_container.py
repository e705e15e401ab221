"""The container image, built and run for real with podman (no Docker engine, no registry here).

Builds docker/Dockerfile with docker/build-image.sh on the local Debian base image
(docker/build-local-base.sh makes it once with debootstrap), starts the image as its non-root
user with ``--network host`` on a free loopback port, waits for the image's own HEALTHCHECK to
pass, runs a pipeline through it from the host with the ``tensorline run`` CLI, then sends
SIGTERM while a call is in flight and checks the drain: the call completes, exit code 0, the log
says it drained.

``test_escape_suite_core_in_the_image`` runs the core of the sandbox escape suite
(tests/server/test_sandbox_escape.py) against the image run as production would, and writes the
sandbox layers the container has to the test output (CI's log).

Marked ``container``: ``.ci/test -m 'not container'`` skips it locally. It skips by itself only
when podman is missing outside CI; in CI (.ci/run installs podman) a missing podman fails.
Cleans up its container and image; keeps the base image as a cache for the next run.
"""

from __future__ import annotations

import json
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorline.client import Client, TensorlineError
from tensorline.server._settings import DEFAULT_REQUIRED_LAYERS
from tests.support import escape
from tests.support.containers import ULIMITS, podman
from tests.support.processes import REPO_ROOT, free_port, health_status, tensorline_command, wait_until

IMAGE_UID = "10001"
# The repository's tests, mounted read-only where the image's python finds them.
TESTS_MOUNT = ("--volume", f"{REPO_ROOT / 'tests'}:/opt/tensorline-tests/tests:ro",
               "--env", "PYTHONPATH=/opt/tensorline-tests")
# How production runs the image (docker/k8s/deployment.yaml, docker-compose.yml): read-only
# root (podman mounts a tmpfs on /tmp), no capabilities, no privilege escalation.
HARDENING = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")

pytestmark = [pytest.mark.container, pytest.mark.timeout(1500)]


@pytest.fixture
def container_name() -> Iterator[str]:
    name = f"tensorline-test-{uuid.uuid4().hex[:10]}"
    yield name
    podman("rm", "--force", "--time", "0", name, check=False)


def running(name: str) -> str | None:
    """None while the container runs, else why it stopped (for failing fast)."""
    state = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name,
                   check=False)
    if state.returncode == 0 and state.stdout.split()[:1] == ["running"]:
        return None
    logs = podman("logs", name, check=False)
    return f"container is {state.stdout.strip()}: {logs.stdout[-3000:]}{logs.stderr[-3000:]}"


def test_image_builds_runs_serves_and_drains(tensorline_image: str, container_name: str,
                                             tmp_path: Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    markers = tmp_path / "markers"
    markers.mkdir()
    markers.chmod(0o777)  # the container's user (uid 10001) writes the in-flight marker here
    podman(
        "run", "--detach", "--name", container_name, "--network", "host", *ULIMITS,
        *HARDENING,
        "--env", f"TENSORLINE_PORT={port}",
        "--env", "TENSORLINE_INSTANCE_ID=container-test",
        "--env", "TENSORLINE_GRACE_S=20",
        # Test-only nodes (Sleep) from this repository, mounted read-only.
        *TESTS_MOUNT,
        "--volume", f"{markers}:/markers",
        "--env", "TENSORLINE_NODE_MODULES=tests.support.nodes",
        tensorline_image,
    )

    # 1. The image's own HEALTHCHECK command passes (gRPC health SERVING).
    wait_until(lambda: podman("healthcheck", "run", container_name, check=False).returncode == 0,
               timeout=90, interval=0.25, what="HEALTHCHECK passing",
               abort=lambda: running(container_name))

    # 2. It runs as the non-root user.
    assert podman("exec", container_name, "id", "-u").stdout.strip() == IMAGE_UID
    assert podman("inspect", "--format", "{{.Config.User}}", container_name
                  ).stdout.strip().startswith(IMAGE_UID)

    # 3. A pipeline through it from the host, with the product CLI.
    (tmp_path / "pipeline.yaml").write_text(
        "version: v1\n"
        "metadata: {name: container-test}\n"
        "nodes:\n"
        "  - {id: double, node_type: Scale, params: {factor: 2}}\n")
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "x.npy", data)
    run = subprocess.run(
        [*tensorline_command(), "run", str(tmp_path / "pipeline.yaml"), "--server", target,
         "--input", f"double={tmp_path / 'x.npy'}", "--output", str(tmp_path / "out.npz")],
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout + run.stderr
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_array_equal(out["double"], data * 2)

    with Client(target, timeout=30) as client:
        assert client.server_info().instance_id == "container-test"

        # 4. SIGTERM with a call in flight: the call completes, the server exits 0 after draining.
        marker = markers / "started"
        manifest = {"version": "v1", "nodes": [{"id": "hold", "node_type": "Sleep", "params": {
            "ms": 2000, "started_marker": "/markers/started"}}]}
        outcome: dict[str, object] = {}

        def slow_call() -> None:
            try:
                outcome["result"] = client.execute(manifest, {"hold": data}, timeout=60)
            except Exception as error:  # reported by the assertion below
                outcome["error"] = error

        caller = threading.Thread(target=slow_call)
        caller.start()
        try:
            wait_until(marker.exists, timeout=30, what="the slow call running in the container",
                       abort=lambda: repr(outcome.get("error")) if "error" in outcome else None)
            stop = podman("stop", "--time", "30", container_name, timeout=60)  # SIGTERM
        finally:
            caller.join(timeout=60)
    assert stop.returncode == 0
    assert "error" not in outcome, outcome
    result = outcome["result"]
    np.testing.assert_array_equal(result["hold"], data)  # type: ignore[index]

    exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", container_name)
    logs = podman("logs", container_name)
    text = logs.stdout + logs.stderr
    assert exit_code.stdout.strip() == "0", text
    assert "drain" in text.lower(), text


# --- the escape suite's core in the image --------------------------------------------------

# Layers every host has (GetServerInfo sandbox_layers): a worker process with a minimal
# environment, only its own descriptors, rlimits, no capabilities.
ALWAYS_ACTIVE = ("process", "environment", "descriptors", "rlimits", "capabilities")


def still_serving(client: Client, target: str) -> None:
    escape.sandboxed_call_works(client)
    assert health_status(target, timeout=5.0) == "SERVING"


def check_environment(client: Client, domain: str, secret: str) -> None:
    seen = escape.look(client, domain, "environ").value
    assert secret not in json.dumps(seen), seen
    assert set(seen["os.environ"]) <= escape.WORKER_ENVIRONMENT, seen["os.environ"]


def check_descriptors(client: Client, domain: str) -> None:
    seen = escape.look(client, domain, "fds").value
    assert seen["0"] == "/dev/null", seen
    assert seen["1"].startswith("pipe:") and seen["1"] == seen["2"], seen
    assert seen["3"].startswith("socket:"), seen


def escape_suite_core(client: Client, target: str, secret: str) -> None:
    """The core attacks of tests/server/test_sandbox_escape.py, for the untrusted ``Attack``
    and the trusted ``TrustedAttack`` sent to the sandbox; after each the server still serves."""
    for domain in escape.DOMAINS:
        check_environment(client, domain, secret)
        still_serving(client, target)
        # /proc/1 is the server: it is PID 1 in the container.
        for path in ("/etc/shadow", "/proc/1/environ"):
            error = escape.refused(client, domain, "read", (grpc.StatusCode.PERMISSION_DENIED,
                                                            grpc.StatusCode.UNKNOWN),
                                   secret=secret, path=path)
            if error.code == grpc.StatusCode.UNKNOWN:
                assert "FileNotFoundError" in error.message, (path, error.message)
            still_serving(client, target)
        # 3 GiB of shared anonymous memory against the 1 GiB worker cap.
        escape.refused(client, domain, "mmap_shared", (grpc.StatusCode.RESOURCE_EXHAUSTED,),
                       secret=secret, count=3)
        still_serving(client, target)
        escape.refused(client, domain, "fork", (grpc.StatusCode.PERMISSION_DENIED,),
                       secret=secret)
        still_serving(client, target)
        # Threads with small stacks (64 MiB for 1,000): the per-worker thread cap holds though
        # the worker shares the server's uid.
        error = escape.refused(client, domain, "small_stack_threads",
                               (grpc.StatusCode.RESOURCE_EXHAUSTED,), secret=secret, count=1000)
        assert "thread" in error.message, error.message
        still_serving(client, target)
        # The workers share the server's uid here, and neither holds a capability: only the
        # sandbox keeps a worker from renicing, idling, pinning, limiting or SIGIO-signalling
        # the server.
        for what in ("slow_down_others", "sigio_signal"):
            seen = escape.look(client, domain, what, pid=1).value
            assert seen["worked"] == [], (what, seen)
            still_serving(client, target)
        seen = escape.look(client, domain, "outlive_the_launcher").value
        assert seen == {"worked": [], "pdeathsig": 9}, seen
        still_serving(client, target)
        check_descriptors(client, domain)
        still_serving(client, target)
        # A worker out of descriptors is replaced before the next call of its domain.
        assert escape.look(client, domain, "leak_fds").value["leaked"] > 100
        for _ in range(6):
            check_descriptors(client, domain)
        still_serving(client, target)


def test_escape_suite_core_in_the_image(tensorline_image: str, container_name: str,
                                        capsys: pytest.CaptureFixture[str],
                                        record_property: Callable[[str, object], None]) -> None:
    """The image run as production runs it (uid 10001, read-only root, no capabilities,
    no_new_privs) with a secret in its environment and the escape suite's hostile modules:
    report the sandbox layers it has; with every layer untrusted code requires by default,
    run the suite's core attacks; without, untrusted nodes are refused naming the layer and
    trusted sandboxed calls still work. Then SIGTERM: exit code 0."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    secret = f"hunter2-{uuid.uuid4().hex}"
    podman(
        "run", "--detach", "--name", container_name, "--network", "host", *ULIMITS,
        *HARDENING, "--user", f"{IMAGE_UID}:{IMAGE_UID}",
        "--env", f"TENSORLINE_PORT={port}",
        "--env", f"TL_SECRET={secret}",
        "--env", "TENSORLINE_SANDBOX_WORKERS=2",
        "--env", "TENSORLINE_SANDBOX_CPU_SECONDS=10",
        "--env", "TENSORLINE_SANDBOX_MEMORY_MB=1024",
        "--env", f"TENSORLINE_UNTRUSTED_MODULES={escape.UNTRUSTED}",
        "--env", f"TENSORLINE_NODE_MODULES={escape.TRUSTED}",
        *TESTS_MOUNT,
        tensorline_image,
    )
    wait_until(lambda: health_status(target) == "SERVING", timeout=90, interval=0.25,
               what="the container serving", abort=lambda: running(container_name))

    with Client(target, timeout=60) as client:
        # 1. Which layers the container has, in the test output (CI's log) and the JUnit report.
        layers = list(client.server_info().sandbox_layers)
        report = escape.layer_report(layers)
        record_property("sandbox_layers", report)
        with capsys.disabled():
            print(f"\nsandbox layers in the container ({tensorline_image}):\n{report}",
                  flush=True)
        active = {layer.name for layer in layers if layer.active}
        assert set(ALWAYS_ACTIVE) <= active, report

        # 2. The escape suite's core, or the refusal of untrusted code.
        missing = [name for name in DEFAULT_REQUIRED_LAYERS if name not in active]
        if not missing:
            escape_suite_core(client, target, secret)
        else:
            with pytest.raises(TensorlineError) as caught:
                client.execute(escape.manifest("untrusted", "environ"))
            error = caught.value
            assert error.code == grpc.StatusCode.FAILED_PRECONDITION, (error.code, error.message)
            assert "'bad'" in error.message and any(name in error.message for name in missing), \
                (missing, error.message)
            check_environment(client, "trusted", secret)
            check_descriptors(client, "trusted")
        still_serving(client, target)

        # Tensors reach workers in memfd segments, not /dev/shm files: one larger than the
        # container's /dev/shm (podman's 64 MB default, no --shm-size) crosses the boundary.
        shm_bytes = 1024 * int(podman("exec", container_name, "df", "-k", "--output=size",
                                      "/dev/shm").stdout.split()[-1])
        big = np.arange(shm_bytes // 8 + (8 << 20), dtype=np.float64)
        result = client.execute({"nodes": [{"id": "big", "node_type": "PassThrough",
                                            "runtime_hint": "sandbox"}]}, {"big": big})
        assert result.metrics.nodes[0].runtime == "sandbox"
        np.testing.assert_array_equal(result["big"], big)

    # 3. SIGTERM: the server drains and exits 0.
    podman("stop", "--time", "30", container_name, timeout=60)
    exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", container_name)
    logs = podman("logs", container_name)
    text = logs.stdout + logs.stderr
    assert exit_code.stdout.strip() == "0", text[-6000:]
    assert secret not in text
