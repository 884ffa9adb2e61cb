#!/usr/bin/env bash
# Build a local Debian bookworm base image with Python 3.11 without any registry:
# `debootstrap --variant=minbase` from the Debian mirror, then `docker import`.
# For machines that cannot reach Docker Hub (CI here); elsewhere the Dockerfiles'
# default BASE_IMAGE (an official Python image) is simpler.
#
#   docker/base-image.sh [TAG]        (default TAG: mlops-tune-base:bookworm; needs root)
set -euo pipefail
tag="${1:-mlops-tune-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$tag" >/dev/null 2>&1 && [ -z "${REBUILD:-}" ]; then
  echo "base image $tag exists (REBUILD=1 to make it again)"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image.sh: debootstrap is missing (apt-get install debootstrap)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "base-image.sh: debootstrap needs root" >&2; exit 2; }

rootfs="$(mktemp -d /tmp/mlops-tune-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap bookworm (minbase + python3) from $mirror ..."
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import -c 'CMD ["python3"]' - "$tag" >/dev/null
echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
