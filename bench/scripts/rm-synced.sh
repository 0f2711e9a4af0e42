#!/bin/bash
# `rm -rf` of a tree every node has (docs/benchmarks.md, session 46): `tar x` of ARCHIVE
# into node A's mount of a two-node cluster, wait until B lists every file and A has no
# change left to send, then time `rm -rf` on A and until B lists nothing; the same
# `rm -rf` on the native disk and on bindfs (after `tar x` and `sync` there), systems
# taking turns. PERF=1 records node A during its `rm -rf` (/var/tmp/rm-synced.perf.data,
# reported to stdout).
# Usage: bench/scripts/rm-synced.sh [-r ROUNDS] [-a ARCHIVE] BIN_DIR   (needs scripts/setup.sh, setup-bench.sh)
set -u
. "$(dirname "$0")/cluster.sh"
ROUNDS=1 ARCHIVE=
while getopts r:a: o; do case $o in r) ROUNDS=$OPTARG ;; a) ARCHIVE=$OPTARG ;; *) exit 2 ;; esac; done
shift $((OPTIND - 1))
[ $# -eq 1 ] || { echo "usage: $0 [-r ROUNDS] [-a ARCHIVE] BIN_DIR" >&2; exit 2; }
bin=$(realpath "$1") d=$(mktemp -d /var/tmp/rm-synced.XXXXXX)
if [ -z "$ARCHIVE" ]; then
  ARCHIVE=$d/src.tar
  registry_archive "$ARCHIVE"
fi
files=$(tar tf "$ARCHIVE" | grep -vc '/$')
mkdir -p "$d/native" "$d/bind-src" "$d/bind"
bindfs --no-allow-other "$d/bind-src" "$d/bind"
cluster_start "$bin" "$d" a b
pending() { "$bin/syncctl" --data "$d/data-a" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pending_changes"])'; }
now() { date +%s.%N; }
for r in $(seq "$ROUNDS"); do
  for sys in native bind a; do
    w=$d/$sys/r$r
    mkdir "$w"
    tar xf "$ARCHIVE" -C "$w"
    sync
    if [ "$sys" = a ]; then
      t=$(now)
      while [ "$(find "$d/b/r$r" -type f 2>/dev/null | wc -l)" -lt "$files" ] || [ "$(pending)" != 0 ]; do
        [ "$(echo "$(now) - $t < 600" | bc)" = 1 ] || { echo "B never got the tree" >&2; exit 1; }
        sleep 0.5
      done
      sync
      [ "${PERF:-0}" = 1 ] && { perf record -F 999 -g -o /var/tmp/rm-synced.perf.data -p "${CLUSTER_PIDS[1]}" >/dev/null 2>&1 & perfpid=$!; sleep 1; }
    fi
    t0=$(now); rm -rf "$w"; t1=$(now)
    if [ "$sys" = a ]; then
      [ "${PERF:-0}" = 1 ] && { kill -INT "$perfpid"; wait "$perfpid"; }
      while [ -e "$d/b/r$r" ]; do
        [ "$(echo "$(now) - $t1 < 600" | bc)" = 1 ] || { echo "B never removed the tree" >&2; exit 1; }
        sleep 0.1
      done
      t2=$(now)
      printf 'round %d %-6s rm -rf %6.2f s, gone on B %6.2f s after the start\n' "$r" "$sys" "$(echo "$t1 - $t0" | bc)" "$(echo "$t2 - $t0" | bc)"
    else
      printf 'round %d %-6s rm -rf %6.2f s\n' "$r" "$sys" "$(echo "$t1 - $t0" | bc)"
    fi
  done
done
cluster_stop "$d"
umount "$d/bind" 2>/dev/null
[ "${PERF:-0}" = 1 ] && perf report -i /var/tmp/rm-synced.perf.data --no-children --percent-limit 1.5 --stdio 2>/dev/null | grep -v '^$' | head -120
rm -rf "$d"
