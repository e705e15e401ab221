"""The container image, built and run for real with podman (no Docker engine, no registry here).

Builds docker/Dockerfile with docker/build-image.sh on the local Debian base image
(docker/build-local-base.sh makes it once with debootstrap), starts the image as its non-root
user with ``--network host`` on a free loopback port, waits for the image's own HEALTHCHECK to
pass, runs a pipeline through it from the host with the ``tensorline run`` CLI, then sends
SIGTERM while a call is in flight and checks the drain: the call completes, exit code 0, the log
says it drained.

Marked ``container``: ``.ci/test -m 'not container'`` skips it locally. It skips by itself only
when podman is missing outside CI; in CI (.ci/run installs podman) a missing podman fails.
Cleans up its container and image; keeps the base image as a cache for the next run.
"""

from __future__ import annotations

import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tensorline.client import Client
from tests.support.containers import ULIMITS, podman
from tests.support.processes import REPO_ROOT, free_port, tensorline_command, wait_until

IMAGE_UID = "10001"
SHM_MB = 256

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
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # the container's user (uid 10001) writes the in-flight marker here
    podman(
        "run", "--detach", "--name", container_name, "--network", "host", *ULIMITS,
        "--shm-size", f"{SHM_MB}m",
        # The hardening of docker/k8s/deployment.yaml and docker-compose.yml: read-only root
        # (podman mounts a tmpfs on /tmp), no capabilities, no privilege escalation.
        "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--env", f"TENSORLINE_PORT={port}",
        "--env", "TENSORLINE_INSTANCE_ID=container-test",
        "--env", "TENSORLINE_GRACE_S=20",
        # Test-only nodes (Sleep) from this repository, mounted read-only.
        "--volume", f"{REPO_ROOT / 'tests'}:/opt/tensorline-tests/tests:ro",
        "--volume", f"{shared}:/shared",
        "--env", "PYTHONPATH=/opt/tensorline-tests",
        "--env", "TENSORLINE_NODE_MODULES=tests.support.nodes",
        tensorline_image,
    )

    # 1. The image's own HEALTHCHECK command passes (gRPC health SERVING).
    wait_until(lambda: podman("healthcheck", "run", container_name, check=False).returncode == 0,
               timeout=90, interval=0.25, what="HEALTHCHECK passing",
               abort=lambda: running(container_name))

    # 2. It runs as the non-root user, with the /dev/shm size it was given.
    assert podman("exec", container_name, "id", "-u").stdout.strip() == IMAGE_UID
    assert podman("inspect", "--format", "{{.Config.User}}", container_name
                  ).stdout.strip().startswith(IMAGE_UID)
    shm_kb = int(podman("exec", container_name, "df", "-k", "--output=size", "/dev/shm")
                 .stdout.split()[-1])
    assert shm_kb == SHM_MB * 1024

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
        marker = shared / "started"
        manifest = {"version": "v1", "nodes": [{"id": "hold", "node_type": "Sleep", "params": {
            "ms": 2000, "started_marker": "/shared/started"}}]}
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
