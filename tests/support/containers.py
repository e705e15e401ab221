"""podman for tests: the flags these machines need, image builds and cleanup.

The flags, and why (docker/README.md, "Here, with podman"): runc, because crun refuses hosts
with hybrid cgroups ("cgroups in hybrid mode not supported"); the cgroupfs manager, because there
is no systemd session to ask; ulimits below the hard limits, because podman's defaults fail with
"setrlimit ... operation not permitted". ``containers_conf`` writes the same settings as a
containers.conf for tools that call podman themselves (podman-compose), passed through the
CONTAINERS_CONF variable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.processes import REPO_ROOT

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PODMAN_GLOBAL = ("--runtime", "runc", "--cgroup-manager=cgroupfs")
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
BASE_IMAGE = os.environ.get("TENSORLINE_TEST_BASE_IMAGE", "localhost/debian-py:bookworm")

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""

# An nginx image made from the local base with Debian's package, for the compose test (the
# compose file's nginx image comes from a registry this machine cannot reach).
NGINX_CONTAINERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light \\
 && rm -rf /var/lib/apt/lists/*
CMD ["nginx", "-g", "daemon off;"]
"""


def require(*tools: str) -> None:
    """Skip when a tool is missing, except in CI, where .ci/run installs it: fail there."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not missing:
        return
    message = f"{', '.join(missing)} not installed (see .ci/run for the apt packages)"
    if IN_CI:
        pytest.fail(f"{message}; .ci/run should have installed it")
    pytest.skip(message)


def podman(*args: str, check: bool = True, timeout: float = 120.0,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``podman`` with this machine's flags; output captured as text."""
    return subprocess.run(["podman", *PODMAN_GLOBAL, *args], capture_output=True, text=True,
                          check=check, timeout=timeout, stdin=subprocess.DEVNULL, env=env)


def image_exists(image: str) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


def containers_conf(directory: Path) -> Path:
    path = directory / "containers.conf"
    path.write_text(CONTAINERS_CONF)
    return path


def build_tensorline_image(tag: str, log: Path) -> float:
    """docker/build-image.sh (makes the base image first if needed); returns seconds taken."""
    if not image_exists(BASE_IMAGE):
        require("debootstrap")
    env = {**os.environ, "PYTHON": sys.executable, "BASE_IMAGE": BASE_IMAGE}
    started = time.monotonic()
    with log.open("w") as out:
        result = subprocess.run([str(REPO_ROOT / "docker" / "build-image.sh"), tag], env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                timeout=1200, check=False)
    assert result.returncode == 0, log.read_text()[-6000:]
    return time.monotonic() - started


def build_nginx_image(tag: str, directory: Path) -> None:
    """A local nginx image (Debian's nginx-light on the local base); needs the Debian mirror."""
    (directory / "Containerfile").write_text(NGINX_CONTAINERFILE)
    podman("build", "--quiet", "--network", "host", *ULIMITS, "--build-arg",
           f"BASE_IMAGE={BASE_IMAGE}", "--tag", tag, str(directory), timeout=600)


def remove_image(tag: str) -> None:
    podman("rmi", "--force", tag, check=False)
