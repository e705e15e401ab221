"""Fixtures of the deployment tests: the container image, built once per test session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.support.containers import build_tensorline_image, remove_image, require


@pytest.fixture(scope="session")
def tensorline_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """docker/Dockerfile built with podman (docker/build-image.sh) on the local base image;
    removed again at the end of the session (the base image stays as a cache)."""
    require("podman")
    tag = f"localhost/tensorline-test:{uuid.uuid4().hex[:10]}"
    log = tmp_path_factory.mktemp("image-build") / "build.log"
    try:
        seconds = build_tensorline_image(tag, log)
        print(f"\nimage {tag} built in {seconds:.0f} s (log {log})")
        yield tag
    finally:
        remove_image(tag)
