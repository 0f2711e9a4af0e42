#!/usr/bin/env bash
# POSIX conformance of a node's mount, measured with pjdfstest (github.com/pjd/pjdfstest).
# A benchmark, not part of the test suite: pjdfstest's code is not ours to vendor, so this
# takes a checkout you provide and builds it there.
#
#   scripts/pjdfstest.sh /path/to/pjdfstest [prove arguments, e.g. -j2 or a test subdir]
#
# Starts a manager and one node (release builds) on a vhost of their own, runs
# `prove -r` inside the mount, prints the summary, and always unmounts and cleans up.
# The result is recorded in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
log() { printf '[pjdfstest] %s\n' "$*" >&2; }

src=${1:?usage: scripts/pjdfstest.sh PJDFSTEST_CHECKOUT [prove args]}
shift
src=$(cd "$src" && pwd)

missing=()
for tool in autoreconf:autoconf automake:automake libtoolize:libtool prove:perl make:make; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -x "$src/pjdfstest" ]; then
  log "building pjdfstest in $src"
  (cd "$src" && autoreconf -ifs && ./configure && make pjdfstest) >/dev/null
fi

scripts/setup.sh
cargo build --release -p manager -p fs-node

work=$(mktemp -d /tmp/syncfs-pjdfstest.XXXXXX)
vhost="pjdfstest-$$"
url="amqp://guest:guest@127.0.0.1:5672/$vhost?heartbeat=10"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  umount "$work/mnt" 2>/dev/null || umount -l "$work/mnt" 2>/dev/null || true
  rabbitmqctl -q delete_vhost "$vhost" >/dev/null 2>&1 || true
  log "logs and prove output kept in $work"
}
trap cleanup EXIT
rabbitmqctl -q add_vhost "$vhost"
rabbitmqctl -q set_permissions -p "$vhost" guest '.*' '.*' '.*'

"$root/target/release/manager" serve --http 127.0.0.1:0 --broker "$url" --db "$work/manager.db" >"$work/manager.log" 2>&1 &
pids+=($!)
"$root/target/release/fs-node" --id pjd --mount "$work/mnt" --data "$work/data" --broker "$url" >"$work/node.log" 2>&1 &
pids+=($!)
deadline=$((SECONDS + 60))
until [ -s "$work/data/node.url" ]; do
  [ $SECONDS -lt $deadline ] || { log "the node did not mount within 60 s"; tail -n 30 "$work/node.log"; exit 1; }
  sleep 0.2
done

log "running prove -r $src/tests inside $work/mnt"
start=$SECONDS
set +e
(cd "$work/mnt" && prove -r "$@" "$src/tests") >"$work/prove.log" 2>&1
status=$?
set -e
tail -n 25 "$work/prove.log"
log "prove exited $status after $((SECONDS - start)) s (pjdfstest commit $(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo unknown))"
exit $status
