#!/usr/bin/env bash
# What files made and deleted under ever new names leave on a node (docs/benchmarks.md,
# session 47): for each wait in WAITS (a node's --forget-deletes-after), a cluster of
# nodes a and b; ROUNDS times, a makes FILES files of 1 KiB in a directory never used
# before, b shows them, a deletes the directory, b shows that, and b syncs. After each
# round: b's revisions kept (syncctl status), its resident memory and its node.db (the
# file, and its write-ahead log, which SQLite copies into it every 32 MiB).
#   bench/scripts/churn-memory.sh [-n FILES] [-r ROUNDS] [-w "30d 0s"] BIN_DIR
set -euo pipefail
files=20000 rounds=5 waits="30d 0s"
while getopts n:r:w: o; do case $o in n) files=$OPTARG ;; r) rounds=$OPTARG ;; w) waits=$OPTARG ;; *) exit 2 ;; esac; done
shift $((OPTIND - 1))
bin=$(realpath "$1")
. "$(dirname "$0")/cluster.sh"

status() { "$bin/syncctl" --data "$d/data-$1" status --json 2>/dev/null; }
field() { status "$1" | python3 -c "import json,sys; print(json.load(sys.stdin)[sys.argv[1]])" "$2"; }
wait_for() { # wait_for WHAT CMD...: until CMD succeeds, at most 600 s
  local what=$1 i
  shift
  for i in $(seq 6000); do "$@" && return 0; sleep 0.1; done
  echo "timed out waiting for $what" >&2
  return 1
}
drained() { [ "$(field a pending_changes)" = 0 ] && [ "$(field b pending_pulls)" = 0 ]; }
count_is() { [ "$(find "$d/b/$1" -type f 2>/dev/null | wc -l)" = "$2" ]; }
gone_on_b() { [ ! -e "$d/b/$1" ]; }

echo "| wait | round | files made and deleted so far | b: revisions kept | b: RSS MiB | b: node.db + its WAL, MiB |"
echo "|---|---|---|---|---|---|"
for wait in $waits; do
  d=$(mktemp -d)
  SYNC_FORGET_DELETES_AFTER=$wait cluster_start "$bin" "$d" a b
  b_pid=${CLUSTER_PIDS[2]}
  for r in $(seq "$rounds"); do
    dir=churn-$r
    python3 - "$d/a/$dir" "$files" <<'EOF'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
os.mkdir(root)
block = b"x" * 1024
for i in range(n):
    sub = os.path.join(root, f"d{i // 1000:03}")
    if i % 1000 == 0:
        os.mkdir(sub)
    with open(os.path.join(sub, f"f{i:06}"), "wb") as f:
        f.write(block)
EOF
    wait_for "b to show round $r" count_is "$dir" "$files"
    wait_for "a and b to drain" drained
    rm -rf "${d:?}/a/$dir"
    wait_for "b to lose round $r" gone_on_b "$dir"
    wait_for "a to drain" drained
    "$bin/syncctl" --data "$d/data-b" sync >/dev/null 2>&1
    rss=$(awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$b_pid/status")
    db=$(du -m "$d/data-b/node.db" | cut -f1) wal=$(du -m "$d/data-b/node.db-wal" | cut -f1)
    echo "| $wait | $r | $((r * files)) | $(field b revisions_kept) | $rss | $db + $wal |"
  done
  cluster_stop "$d"
  rm -rf "$d"
done
