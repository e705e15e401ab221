#!/usr/bin/env bash
# Builds docker/Dockerfile with podman on this kind of machine (no Docker engine, no image
# registry; docker/README.md, "Here, with podman", says which podman flags and why):
#   1. makes a wheelhouse on the host with the host's pip (which already trusts the machine's CA
#      bundle and knows its package indexes): the project's wheel, its dependencies, and
#      setuptools/wheel for building the project inside the image;
#   2. `podman build`s the image with that wheelhouse mounted read-only at /wheels and pip told
#      to install from it alone (--no-index), so the build needs no network at all.
#
# Usage: docker/build-image.sh [TAG]    (default localhost/tensorline:dev)
# Environment:
#   BASE_IMAGE   base of both stages (default localhost/debian-py:bookworm, made by
#                docker/build-local-base.sh when missing; python:3.11-slim needs a registry)
#   PYTHON       host interpreter that builds the wheelhouse; its minor version must match
#                the base image's python3 (default: python3.11)
#   WHEELHOUSE   keep the wheelhouse in this directory instead of a temporary one
set -euo pipefail

tag="${1:-localhost/tensorline:dev}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
base="${BASE_IMAGE:-localhost/debian-py:bookworm}"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
podman_global=(--runtime runc --cgroup-manager=cgroupfs)
ulimits=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

start=$SECONDS
if [[ "$base" == localhost/debian-py:* ]] && ! podman image exists "$base"; then
    "$repo/docker/build-local-base.sh" "$base"
fi

# The wheels are built for the host's interpreter: it must be the image's Python minor version.
host_py="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
image_py="$(podman "${podman_global[@]}" run --rm --network none "${ulimits[@]}" "$base" \
    python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$host_py" != "$image_py" ]]; then
    echo "build-image: host python $host_py ($python) != python $image_py in $base;" \
        "set PYTHON to a python$image_py" >&2
    exit 1
fi

if [[ -n "${WHEELHOUSE:-}" ]]; then
    wheels="$WHEELHOUSE"
    mkdir -p "$wheels"
else
    wheels="$(mktemp -d /var/tmp/tensorline-wheels.XXXXXX)"
    trap 'rm -rf "$wheels"' EXIT
fi
echo "build-image: wheelhouse in $wheels ($python)"
"$python" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$wheels" \
    "${repo}[server]" 'setuptools>=68' wheel

echo "build-image: podman build $tag (base $base)"
podman "${podman_global[@]}" build \
    --format docker \
    --network none \
    "${ulimits[@]}" \
    --volume "$wheels:/wheels:ro" \
    --build-arg "BASE_IMAGE=$base" \
    --build-arg "PIP_INSTALL_ARGS=--no-index --find-links /wheels" \
    --file "$repo/docker/Dockerfile" \
    --tag "$tag" \
    "$repo"
# The builder stage is left behind as a dangling image: drop it.
podman image prune --force --filter label=org.tensorline.stage=builder >/dev/null
echo "build-image: built $tag in $((SECONDS - start)) s"
