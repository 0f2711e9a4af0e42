#!/usr/bin/env bash
# Makes the Docker image `syncfs-debian:bookworm-systemd`, a fresh minimal Debian system
# (plus fuse3, and systemd to run the package's units as init) for the package install test, idempotently: built once with debootstrap from
# Debian's own package mirror (the one apt uses) and imported into Docker; later runs
# find it and do nothing. Needs a running dockerd (scripts/setup-docker.sh).
set -euo pipefail
log() { printf '[setup-debian-image] %s\n' "$*" >&2; }

IMAGE=${SYNC_DEBIAN_IMAGE:-syncfs-debian:bookworm-systemd}
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  exit 0
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  log "installing Debian package debootstrap"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq debootstrap >/dev/null || { apt-get -o DPkg::Lock::Timeout=600 update -qq && apt-get -o DPkg::Lock::Timeout=600 install -y -qq debootstrap >/dev/null; }
fi
MIRROR=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOT=$(mktemp -d /tmp/syncfs-debian-XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
log "debootstrap bookworm (minbase, fuse3, systemd) from $MIRROR"
debootstrap --variant=minbase --include=fuse3,systemd,systemd-sysv,dbus bookworm "$ROOT/rootfs" "$MIRROR" >"$ROOT/debootstrap.log" 2>&1 || {
  tail -20 "$ROOT/debootstrap.log" >&2
  exit 1
}
log "importing it as $IMAGE"
tar -C "$ROOT/rootfs" -c . | docker import - "$IMAGE" >/dev/null
log "ready: $IMAGE"
