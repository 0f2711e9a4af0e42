#!/bin/bash
# The floor of any FUSE file system here, beside the node (docs/benchmarks.md, session
# 33): the same small-file work on the native disk, through `nullfs` (bench/src/bin:
# names and attributes in memory, contents dropped, one thread answering at once),
# through bindfs, and through node A's mount of a two-node cluster (syncing to B).
# Per system: N files of 4 KiB created, written and closed, stat'ed, deleted (rates per
# second), then `tar x` of ARCHIVE and `rm -rf` of what it made (seconds). Systems take turns in each round.
# Usage: bench/scripts/fuse-floor.sh [-n N] [-r ROUNDS] [-a ARCHIVE] BIN_DIR
#   (BIN_DIR holds fs-node, manager and nullfs; needs scripts/setup.sh and setup-bench.sh)
set -u
. "$(dirname "$0")/cluster.sh"
N=5000 ROUNDS=2 ARCHIVE=
while getopts n:r:a: o; do case $o in n) N=$OPTARG ;; r) ROUNDS=$OPTARG ;; a) ARCHIVE=$OPTARG ;; *) exit 2 ;; esac; done
shift $((OPTIND - 1))
[ $# -eq 1 ] || { echo "usage: $0 [-n N] [-r ROUNDS] [-a ARCHIVE] BIN_DIR" >&2; exit 2; }
bin=$(realpath "$1") d=$(mktemp -d /var/tmp/fuse-floor.XXXXXX)
if [ -z "$ARCHIVE" ]; then
  ARCHIVE=$d/src.tar
  registry_archive "$ARCHIVE"
fi
mkdir -p "$d/native" "$d/null" "$d/bind-src" "$d/bind"
"$bin/nullfs" "$d/null" >"$d/nullfs.log" 2>&1 & nullpid=$!
bindfs --no-allow-other "$d/bind-src" "$d/bind"
cluster_start "$bin" "$d" a b
for _ in $(seq 100); do mountpoint -q "$d/null" && break; sleep 0.1; done
for r in $(seq "$ROUNDS"); do
  for sys in native null bind a; do
    w=$d/$sys/r$r
    mkdir "$w"
    small=$(python3 - "$w" "$N" <<'PY'
import os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
blk = bytearray(b'\x5a' * 4096)
t = time.time()
for i in range(n):
    blk[:8] = i.to_bytes(8, 'little')
    with open(f"{d}/f{i:06}", "wb") as f: f.write(blk)
c = n / (time.time() - t); t = time.time()
for i in range(n): os.stat(f"{d}/f{i:06}")
s = n / (time.time() - t); t = time.time()
for i in range(n): os.unlink(f"{d}/f{i:06}")
print(f"creates {c:7.0f}/s  stat {s:8.0f}/s  deletes {n / (time.time() - t):7.0f}/s")
PY
)
    mkdir "$w/t"
    t0=$(date +%s.%N); tar xf "$ARCHIVE" -C "$w/t"; t1=$(date +%s.%N)
    rm -rf "$w/t"; t2=$(date +%s.%N)
    printf 'round %d %-7s %s  tar x %6.2f s  rm -rf %6.2f s\n' "$r" "$sys" "$small" "$(echo "$t1 - $t0" | bc)" "$(echo "$t2 - $t1" | bc)"
  done
done
cluster_stop "$d"
kill "$nullpid" 2>/dev/null; wait "$nullpid" 2>/dev/null
umount "$d/bind" "$d/null" 2>/dev/null
rm -rf "$d"
