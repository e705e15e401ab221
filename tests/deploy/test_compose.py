"""docker/docker-compose.yml brought up for real with podman-compose: three replicas behind nginx.

The compose file is used as is, with an override that points its images at the ones this test
built (the tensorline image of this session, and an nginx image made from Debian's package since
the registry image is out of reach) and publishes the balancer on a free port. Checks: calls
through the balancer reach all three replicas by their instance ids, a pipeline runs, and a
replica stopped with SIGTERM drains (exit 0) while the balancer keeps serving from the others.
"""

from __future__ import annotations

import functools
import os
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tensorline.client import Client
from tests.support.containers import (
    build_nginx_image,
    containers_conf,
    podman,
    remove_image,
    require,
)
from tests.support.processes import REPO_ROOT, free_port, health_status, wait_until

pytestmark = [pytest.mark.container, pytest.mark.timeout(1500)]

REPLICAS = ("tensorline-1", "tensorline-2", "tensorline-3")


class Compose:
    """``podman-compose -p PROJECT -f docker-compose.yml -f override.yml ...``"""

    def __init__(self, project: str, files: list[Path], env: dict[str, str],
                 target: str) -> None:
        self.project = project
        self.files = files
        self.env = env
        self.target = target  # the balancer, published on the host


    def __call__(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        command = ["podman-compose", "-p", self.project]
        for path in self.files:
            command += ["-f", str(path)]
        return subprocess.run([*command, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL)

    def container(self, service: str) -> str:
        names = podman("ps", "--all", "--format", "{{.Names}}",
                       "--filter", f"label=io.podman.compose.project={self.project}",
                       "--filter", f"label=com.docker.compose.service={service}").stdout.split()
        assert len(names) == 1, (service, names)
        return names[0]

    def remove_leftovers(self) -> None:
        label = f"label=io.podman.compose.project={self.project}"
        for name in podman("ps", "--all", "--format", "{{.Names}}", "--filter", label,
                           check=False).stdout.split():
            podman("rm", "--force", "--time", "0", name, check=False)
        for network in podman("network", "ls", "--format", "{{.Name}}", "--filter", label,
                              check=False).stdout.split():
            podman("network", "rm", "--force", network, check=False)


@pytest.fixture
def nginx_image(tmp_path: Path) -> Iterator[str]:
    tag = f"localhost/tensorline-test-nginx:{uuid.uuid4().hex[:10]}"
    build_nginx_image(tag, tmp_path)
    yield tag
    remove_image(tag)


@pytest.fixture
def compose(tensorline_image: str, nginx_image: str, tmp_path: Path) -> Iterator[Compose]:
    require("podman-compose")
    override = tmp_path / "override.yml"
    override.write_text("services:\n" + "".join(
        f"  {name}:\n    image: {tensorline_image}\n" for name in REPLICAS
    ) + f"  lb:\n    image: {nginx_image}\n")
    port = free_port()
    env = {**os.environ, "CONTAINERS_CONF": str(containers_conf(tmp_path)),
           "TENSORLINE_LB_PORT": str(port)}
    project = f"tltest{uuid.uuid4().hex[:8]}"
    runner = Compose(project, [REPO_ROOT / "docker" / "docker-compose.yml", override], env,
                     target=f"127.0.0.1:{port}")
    try:
        up = runner("up", "-d")
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        yield runner
    finally:
        runner("down", timeout=120)
        runner.remove_leftovers()


def test_compose_replicas_behind_nginx(compose: Compose) -> None:
    target = compose.target
    lb = compose.container("lb")

    def lb_gone() -> str | None:
        state = podman("inspect", "--format", "{{.State.Status}}", lb, check=False).stdout
        if state.strip() in ("running", "created", "starting"):
            return None
        return f"lb is {state.strip()}: {podman('logs', lb, check=False).stderr[-3000:]}"

    # Ready when the balancer answers health from a replica.
    wait_until(lambda: health_status(target) == "SERVING", timeout=120, interval=0.25,
               what=f"SERVING through the balancer at {target}", abort=lb_gone)

    def healthy(service: str) -> bool:
        check = podman("healthcheck", "run", compose.container(service), check=False)
        return check.returncode == 0

    for service in REPLICAS:  # every replica up, so round robin covers them all
        wait_until(functools.partial(healthy, service), timeout=120, interval=0.25,
                   what=f"{service} healthy")

    with Client(target, timeout=30) as client:
        seen = Counter(client.server_info().instance_id for _ in range(30))
        assert set(seen) == set(REPLICAS), seen
        data = np.arange(8, dtype=np.float32)
        manifest = {"version": "v1", "nodes": [
            {"id": "double", "node_type": "Scale", "params": {"factor": 2}}]}
        np.testing.assert_array_equal(client.execute(manifest, {"double": data})["double"],
                                      data * 2)

        # One replica stopped (SIGTERM): it drains and exits 0; the balancer goes on without it.
        victim = compose.container("tensorline-2")
        podman("stop", "--time", "40", victim, timeout=60)
        assert podman("inspect", "--format", "{{.State.ExitCode}}", victim).stdout.strip() == "0"
        logs = podman("logs", victim)
        assert "drain" in (logs.stdout + logs.stderr).lower()
        after = Counter(client.server_info().instance_id for _ in range(30))
        assert set(after) == {"tensorline-1", "tensorline-3"}, after
