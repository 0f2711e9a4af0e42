#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs and starts what the tests
# need (FUSE, RabbitMQ, Docker, moto_server, Chromium), builds the workspace, runs every
# tier (unit, property, real mounts with the real broker, Docker, EC2 endpoint, browser),
# then the tests that must run alone (they restart the shared broker).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test] %s\n' "$*" >&2; }

scripts/setup.sh
for extra in setup-docker.sh setup-debian-image.sh setup-moto.sh setup-browser.sh setup-vagrant.sh; do
  if [ -x "scripts/$extra" ]; then
    log "running scripts/$extra"
    "scripts/$extra"
  fi
done

if ! command -v cargo-nextest >/dev/null 2>&1 && ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest from crates.io"
  cargo install --locked cargo-nextest
fi

FEATURES=(--workspace --all-features)
log "building"
# Binaries and tests in one build: the same feature set, so the test run below does not
# compile the dependencies (the EC2 SDK above all) a second time.
cargo build "${FEATURES[@]}" --all-targets
log "building the release node for the container image (Docker tests)"
cargo build --release -p fs-node
log "running the suite"
cargo nextest run "${FEATURES[@]}" --no-fail-fast "$@"
log "running the tests that must run alone (they restart the shared broker)"
cargo nextest run "${FEATURES[@]}" --no-fail-fast --run-ignored only --test-threads 1 "$@"
# The deterministic simulation of the whole cluster (docs/testing.md): 20,000 seeds,
# about 4 minutes on 2 cores. SIM_SEEDS changes the range.
log "running the simulation: seeds ${SIM_SEEDS:=0..20000}"
cargo build --release -p sim
target/release/sim --seeds "$SIM_SEEDS"
log "all tests passed"
