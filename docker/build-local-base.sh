#!/usr/bin/env bash
# Builds the local base image used by the container tests: a minimal Debian bookworm with
# python3 (3.11), venv and pip, made with debootstrap from Debian's package mirror and imported
# into podman as localhost/debian-py:bookworm. No image registry is involved.
#
# Usage: docker/build-local-base.sh [IMAGE]   (default localhost/debian-py:bookworm)
# Skips the build when the image already exists; set FORCE=1 to rebuild.
# Needs root, debootstrap and podman (docker/README.md, "Here, with podman").
set -euo pipefail

image="${1:-localhost/debian-py:bookworm}"
suite="${DEBIAN_SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-}"

if [[ "${FORCE:-0}" != 1 ]] && podman image exists "$image"; then
    echo "build-local-base: $image already exists, skipping (FORCE=1 rebuilds)"
    exit 0
fi

for tool in debootstrap podman; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "build-local-base: $tool is missing (apt-get install -y podman runc debootstrap)" >&2
        exit 1
    fi
done

# When no mirror is given, reuse the one this machine's apt uses (it is known to be reachable).
if [[ -z "$mirror" ]]; then
    mirror="$(
        {
            grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
            grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}'
        } | grep -v security | head -n1 || true
    )"
    mirror="${mirror:-http://deb.debian.org/debian}"
fi

workdir="$(mktemp -d /var/tmp/debian-py-rootfs.XXXXXX)"
cleanup() { rm -rf "$workdir"; }
trap cleanup EXIT

start=$SECONDS
echo "build-local-base: debootstrap $suite from $mirror into $workdir"
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    "$suite" "$workdir/rootfs" "$mirror" >"$workdir/debootstrap.log" 2>&1 || {
    tail -n 50 "$workdir/debootstrap.log" >&2
    exit 1
}

# Trim what an image never needs: apt lists, caches, docs and man pages.
rm -rf "$workdir"/rootfs/var/lib/apt/lists/* "$workdir"/rootfs/var/cache/apt/*.bin \
    "$workdir"/rootfs/var/cache/apt/archives/*.deb "$workdir"/rootfs/usr/share/doc/* \
    "$workdir"/rootfs/usr/share/man/* "$workdir"/rootfs/usr/share/locale/*

tar -C "$workdir/rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/usr/bin/python3"]' \
    - "$image" >/dev/null
echo "build-local-base: imported $image in $((SECONDS - start)) s"
