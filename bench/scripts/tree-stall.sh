#!/bin/bash
# How long the rest of a mount waits while the node does its periodic work on a large
# tree, and during a sync and a rename of the whole tree (docs/benchmarks.md, session
# 35). For each build dir (holding fs-node, manager and syncctl): a one-node cluster,
# FILES files of 1 KiB in directories of 1,000 written through the mount, then a probe
# loop that creates, writes (4 KiB) and closes a small file every 2 ms:
#   idle    for IDLE seconds (the GC, keep_at_rest and the rest of the node's minute)
#   sync    while `syncctl sync` runs
#   rename  while the directory holding the whole tree is renamed
#   mkdir   while a directory is made where it was, right after
#   sent    after the rename, until the node has sent its changes (none pending)
# Prints, per phase, the probes' median, 99th percentile and longest, and each probe
# over 30 ms with its time. PERF=FILE records the node with `perf record -g` during the
# idle phase.
# Usage: bench/scripts/tree-stall.sh [-n FILES] [-i IDLE] BIN_DIR...   (needs scripts/setup.sh run)
set -u
. "$(dirname "$0")/cluster.sh"
FILES=300000 IDLE=130
while getopts n:i: o; do case $o in n) FILES=$OPTARG ;; i) IDLE=$OPTARG ;; *) exit 2 ;; esac; done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { echo "usage: $0 [-n FILES] [-i IDLE] BIN_DIR..." >&2; exit 2; }
stall() {
  local bin=$1 d=$2
  echo "$bin:"
  python3 - "$d/a" "$FILES" <<'PY'
import os, sys, time
mnt, n = sys.argv[1], int(sys.argv[2])
t = time.time()
for i in range((n + 999) // 1000):
    os.makedirs(f"{mnt}/tree/d{i}")
    for j in range(min(1000, n - i * 1000)):
        with open(f"{mnt}/tree/d{i}/f{j}", "wb") as f:
            f.write(b"x" * 1024)
print(f"  {n} files written in {time.time() - t:.1f} s", flush=True)
PY
  local perf_pid=
  if [ -n "${PERF:-}" ]; then
    perf record -F 999 -g -p "${CLUSTER_PIDS[1]}" -o "$PERF" -- sleep "$((IDLE + 5))" >/dev/null 2>&1 &
    perf_pid=$!
  fi
  python3 - "$d/a" "$IDLE" "$bin" "$d/data-a" <<'PY'
import os, subprocess, sys, threading, time
mnt, idle, bin, data = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
def probe(what, done):
    probes, k = [], 0
    while not done():
        t = time.time()
        with open(f"{mnt}/probe-{what}-{k}", "wb") as f:
            f.write(b"p" * 4096)
        dt = time.time() - t
        probes.append(dt)
        k += 1
        if dt > 0.03:
            print(f"    {what}: a probe took {dt * 1000:.0f} ms at {time.strftime('%H:%M:%S', time.gmtime(t))}", flush=True)
        time.sleep(0.002)
    probes.sort()
    print(f"  {what:6} {len(probes):6} probes: median {probes[len(probes) // 2] * 1000:.2f} ms, p99 {probes[int(len(probes) * .99)] * 1000:.1f} ms, longest {probes[-1] * 1000:.1f} ms", flush=True)
def during(what, change):
    done = threading.Event()
    def run():
        t = time.time()
        try:
            change()
            print(f"  {what} took {time.time() - t:.2f} s", flush=True)
        except Exception as e:
            print(f"  {what} FAILED after {time.time() - t:.2f} s: {e}", flush=True)
        finally:
            done.set()
    worker = threading.Thread(target=run)
    worker.start()
    probe(what, done.is_set)
    worker.join()
t0 = time.time()
probe("idle", lambda: time.time() - t0 > idle)
during("sync", lambda: subprocess.run([f"{bin}/syncctl", "--data", data, "sync"], capture_output=True, check=True))
during("rename", lambda: os.rename(f"{mnt}/tree", f"{mnt}/tree-renamed"))
# `mv tree tree-renamed && mkdir tree`: a directory made where the renamed one was, while
# the rename's changes are still being queued.
during("mkdir", lambda: os.mkdir(f"{mnt}/tree"))
# A large rename's changes are queued and sent after its answer (fs-node's tree/moves.rs):
# the mount is probed until the node has no pending change left (at most 300 s).
def pending():
    import json
    out = subprocess.run([f"{bin}/syncctl", "--data", data, "status", "--json"], capture_output=True, check=True).stdout
    return json.loads(out)["pending_changes"]
def settle():
    t = time.time()
    while pending() > 0 and time.time() - t < 300:
        time.sleep(0.1)
during("sent", settle)
PY
  [ -z "$perf_pid" ] || wait "$perf_pid"
}
on_one_node_clusters stall "$@"
