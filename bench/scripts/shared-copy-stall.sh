#!/bin/bash
# How long the rest of a mount waits while a large file that passthrough readers share
# is copied for a writer (docs/benchmarks.md, session 33). For each build dir (holding
# fs-node and manager): a one-node cluster, a file of SIZE_MIB written through the mount,
# a reader holding it open (passthrough), then a writer's open, and meanwhile, as soon
# as the node's copy has begun (a file in its tmp area), one small file created, written
# and closed; then the writer's close, and the same again during its snapshot's copy.
# Prints how long the writer's open and close took and how long each small file took.
# Usage: bench/scripts/shared-copy-stall.sh [-s SIZE_MIB] BIN_DIR...   (needs scripts/setup.sh run)
set -u
. "$(dirname "$0")/cluster.sh"
SIZE=1024
while getopts s: o; do case $o in s) SIZE=$OPTARG ;; *) exit 2 ;; esac; done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { echo "usage: $0 [-s SIZE_MIB] BIN_DIR..." >&2; exit 2; }
stall() {
  local bin=$1 d=$2
  echo "$bin: $(python3 - "$d/a" "$d/data-a/tmp" "$SIZE" <<'PY'
import os, sys, threading, time
mnt, tmp, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
big = f"{mnt}/big.bin"
with open(big, "wb") as f:
    for i in range(size):
        f.write(os.urandom(1 << 20))
full = size << 20
reader = open(big, "rb")
def copying():
    while True:
        for e in os.scandir(tmp):
            if e.stat().st_size < full:
                return
        time.sleep(0.0005)
def small(name):
    t = time.time()
    with open(f"{mnt}/{name}", "wb") as f:
        f.write(b"x" * 4096)
    return time.time() - t
out = {}
def timed(key, fn):
    t = time.time(); r = fn(); out[key] = time.time() - t; return r
box = {}
th = threading.Thread(target=lambda: box.setdefault("w", timed("open", lambda: open(big, "r+b"))))
th.start(); copying(); s1 = small("during-open"); th.join()
w = box["w"]; w.write(b"changed"); w.flush()
th = threading.Thread(target=lambda: timed("close", w.close))
th.start(); copying(); s2 = small("during-close"); th.join()
print(f"writer's open {out['open']:.3f} s, a small file meanwhile {s1 * 1000:.1f} ms; writer's close {out['close']:.3f} s, a small file meanwhile {s2 * 1000:.1f} ms")
PY
)"
}
on_one_node_clusters stall "$@"
