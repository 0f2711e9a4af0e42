#!/bin/bash
# `find` over a tree whose listings the kernel has not cached yet, through node A's mount
# against the same tree on the native disk (docs/benchmarks.md, session 26).
# Usage: bench/scripts/find-first.sh BIN_DIR [FILES] [ROUNDS]
#   BIN_DIR holds manager, fs-node and syncctl. Starts the manager and nodes a and b on
#   a fresh vhost of the local broker (scripts/setup.sh), writes FILES files of 1 KiB in
#   directories of 1,000 through a's mount (b syncs them) and the same tree on the
#   native disk, then ROUNDS times: creates and deletes one file in every directory of both trees
#   (which drops the kernel's cached listings of the mount, as any local change does),
#   and times `find -type f` on the mount (the first listing of each directory, from the
#   node), on the mount again (from the kernel's cache) and on the native tree.
#   PERF=FILE records `perf record -g -a` of the first mount `find` into FILE.
# Everything is stopped and unmounted at the end (also on failure).
set -euo pipefail
BIN=$(realpath "$1") N=${2:-200000} ROUNDS=${3:-6}
source "$(dirname "$0")/two-nodes.sh"
start_two_nodes "$BIN" find-first
write_tree() { python3 - "$1" "$N" <<'PY'
import os, sys, time
root, n = sys.argv[1], int(sys.argv[2])
data = b'3' * 1024
t = time.perf_counter()
for i in range(n):
    if i % 1000 == 0:
        os.makedirs(os.path.join(root, f'd{i // 1000:04}'), exist_ok=True)
    with open(os.path.join(root, f'd{i // 1000:04}/f{i % 1000:04}'), 'wb') as f:
        f.write(data)
print(f'{root}: {n / (time.perf_counter() - t):.0f} creates/s')
PY
}
touch_dirs() { python3 - "$1" <<'PY'
import os, sys
root = sys.argv[1]
for d in sorted(os.listdir(root)):
    p = os.path.join(root, d, 'touched')
    open(p, 'wb').close()
    os.unlink(p)
PY
}
settled() { # node a has sent every change and heard it decided
  "$BIN/syncctl" --data "$W/data-a" status --json | python3 -c 'import json, sys; sys.exit(json.load(sys.stdin)["pending_changes"] != 0)'
}
timed_find() { # label, root
  local t0 t1 n
  t0=$(date +%s.%N); n=$(find "$2" -type f | wc -l); t1=$(date +%s.%N)
  [ "$n" -eq "$N" ] || { echo "$1: find counted $n of $N files" >&2; exit 1; }
  printf '%s %.3f s\n' "$1" "$(echo "$t1 - $t0" | bc)"
}
write_tree "$W/a/tree"
write_tree "$W/native"
if [ -n "${PERF:-}" ]; then
  touch_dirs "$W/a/tree"; wait_for "node a to send its changes" 600 settled
  perf record -q -g -a -o "$PERF" -- find "$W/a/tree" -type f >/dev/null 2>&1
fi
for r in $(seq "$ROUNDS"); do
  touch_dirs "$W/a/tree"; touch_dirs "$W/native"; wait_for "node a to send its changes" 600 settled
  timed_find "round $r: mount, first listing" "$W/a/tree"
  timed_find "round $r: mount, cached" "$W/a/tree"
  timed_find "round $r: native" "$W/native"
done
