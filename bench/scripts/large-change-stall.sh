#!/bin/bash
# How long the rest of a mount waits while a large file is changed in ways that used to
# copy or hash it under the tree's lock (docs/benchmarks.md, session 34). For each build
# dir (holding fs-node and manager): a one-node cluster, a file of SIZE_MIB written
# through the mount, then each change in turn, while a probe loop creates, writes (4 KiB)
# and closes small files one after another:
#   grow      truncate(2) by name to four times the size (the new zeros are hashed)
#   shrink    truncate(2) by name to half the size and one byte
#   no-leaves the file's cached leaves removed from the store, then an open for writing
#             and a one-byte write in the middle (without leaves: a copy of the file)
# Prints, per change, how long it took, how many small files the probe closed meanwhile
# and the longest of them.
# Usage: bench/scripts/large-change-stall.sh [-s SIZE_MIB] BIN_DIR...   (needs scripts/setup.sh run)
set -u
. "$(dirname "$0")/cluster.sh"
SIZE=1024
while getopts s: o; do case $o in s) SIZE=$OPTARG ;; *) exit 2 ;; esac; done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { echo "usage: $0 [-s SIZE_MIB] BIN_DIR..." >&2; exit 2; }
stall() {
  local bin=$1 d=$2
  echo "$bin:"
  python3 - "$d/a" "$d/data-a" "$SIZE" <<'PY'
import glob, os, sys, threading, time
mnt, data, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
full = size << 20
def fresh(name):
    path = f"{mnt}/{name}"
    with open(path, "wb") as f:
        for _ in range(size):
            f.write(os.urandom(1 << 20))
    return path
def write_in_middle(path):
    with open(path, "r+b") as f:
        f.seek(full // 2)
        f.write(b"x")
def measured(what, change):
    done = threading.Event()
    worker = threading.Thread(target=lambda: (change(), done.set()))
    probes, n = [], 0
    t0 = time.time()
    worker.start()
    while not done.is_set():
        t = time.time()
        with open(f"{mnt}/probe-{what}-{n}", "wb") as f:
            f.write(b"p" * 4096)
        probes.append(time.time() - t)
        n += 1
    worker.join()
    took = time.time() - t0
    print(f"  {what:9} {took:7.3f} s; {len(probes)} small files meanwhile, the longest {max(probes) * 1000:8.1f} ms", flush=True)
big = fresh("grow.bin")
measured("grow", lambda: os.truncate(big, 4 * full))
big = fresh("shrink.bin")
measured("shrink", lambda: os.truncate(big, full // 2 + 1))
big = fresh("leaves.bin")
for p in glob.glob(f"{data}/chunks/*.leaves"):
    os.remove(p)
measured("no-leaves", lambda: write_in_middle(big))
PY
}
on_one_node_clusters stall "$@"
