#!/usr/bin/env bash
# Installs what `syncfs-bench` needs beyond scripts/setup.sh, idempotently, from Debian:
# bindfs (the passthrough row of the sequential part) and Syncthing (the side-by-side
# comparison; Debian 12 ships 1.19.x). Run scripts/setup.sh too: it installs and starts
# RabbitMQ and FUSE. Safe to run again and again: it installs only what is missing.
set -euo pipefail

log() { printf '[setup-bench] %s\n' "$*" >&2; }

need_pkgs=()
command -v bindfs >/dev/null 2>&1 || need_pkgs+=(bindfs)
command -v syncthing >/dev/null 2>&1 || need_pkgs+=(syncthing)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing Debian packages: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
# The package starts no instance of its own for root (its units are per user and off);
# the bench starts and stops its two, on loopback only.
log "bindfs $(bindfs --version 2>&1 | head -n1 | awk '{print $2}'), $(syncthing --version | head -n1 | awk '{print $1, $2}')"
