#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs and starts what the tests
# need (FUSE, RabbitMQ, Docker, moto_server, Chromium), builds the workspace, runs every
# tier (unit, property, real mounts with the real broker, Docker, EC2 endpoint, browser),
# then the tests that must run alone (they restart the shared broker).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test] %s\n' "$*" >&2; }

# setup.sh first: it installs what the build needs (a C compiler, FUSE).
scripts/setup.sh

if ! command -v cargo-nextest >/dev/null 2>&1 && ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest from crates.io"
  cargo install --locked cargo-nextest
fi

FEATURES=(--workspace --all-features)
# The build (bound by the CPU) runs while the other setups (bound by the network and the
# disk: Docker, a Debian image made with debootstrap, moto, Chromium) run beside it.
# Binaries and tests in one build: the same feature set, so the test run below does not
# compile the dependencies (the EC2 SDK above all) a second time. The Docker image and
# the package test pack this build's binaries too, so the suite needs no release build.
build_log=$(mktemp /tmp/syncfs-build-XXXXXX.log)
log "building in the background (log: $build_log)"
cargo build "${FEATURES[@]}" --all-targets >"$build_log" 2>&1 &
build_pid=$!
# A setup that fails (or ^C) must not leave the build running behind the script.
trap 'kill "$build_pid" 2>/dev/null || true' EXIT
for extra in setup-docker.sh setup-debian-image.sh setup-moto.sh setup-browser.sh setup-vagrant.sh; do
  if [ -x "scripts/$extra" ]; then
    log "running scripts/$extra"
    "scripts/$extra"
  fi
done
log "waiting for the build"
if ! wait "$build_pid"; then
  tail -60 "$build_log" >&2
  log "the build failed (whole log: $build_log)"
  exit 1
fi
trap - EXIT
log "running the suite"
cargo nextest run "${FEATURES[@]}" --no-fail-fast "$@"
log "running the tests that must run alone (they restart the shared broker)"
cargo nextest run "${FEATURES[@]}" --no-fail-fast --run-ignored only --test-threads 1 "$@"
# The deterministic simulation of the whole cluster (docs/testing.md): 20,000 seeds,
# about 3 minutes on 2 cores, from the test build (the workspace's own crates are
# optimised in it, Cargo.toml). SIM_SEEDS changes the range.
log "running the simulation: seeds ${SIM_SEEDS:=0..20000}"
target/debug/sim --seeds "$SIM_SEEDS"
log "all tests passed"
