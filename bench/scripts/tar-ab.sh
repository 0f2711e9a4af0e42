#!/bin/bash
# `tar x` into node A's mount of a two-node cluster, builds taking turns (docs/benchmarks.md,
# session 33): how long tar took, and when B listed every file. ARCHIVE defaults to the
# local cargo registry's unpacked crates.
# Usage: bench/scripts/tar-ab.sh [-r ROUNDS] [-a ARCHIVE] BIN_DIR...   (needs scripts/setup.sh run)
set -u
. "$(dirname "$0")/cluster.sh"
ROUNDS=3 ARCHIVE=
while getopts r:a: o; do case $o in r) ROUNDS=$OPTARG ;; a) ARCHIVE=$OPTARG ;; *) exit 2 ;; esac; done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { echo "usage: $0 [-r ROUNDS] [-a ARCHIVE] BIN_DIR..." >&2; exit 2; }
if [ -z "$ARCHIVE" ]; then
  ARCHIVE=$(mktemp /var/tmp/tar-ab.XXXXXX.tar)
  registry_archive "$ARCHIVE"
fi
files=$(tar tf "$ARCHIVE" | grep -vc '/$')
for r in $(seq "$ROUNDS"); do
  for bin in "$@"; do
    bin=$(realpath "$bin") d=$(mktemp -d)
    cluster_start "$bin" "$d" a b
    mkdir "$d/a/t"; sync
    t0=$(date +%s.%N); tar xf "$ARCHIVE" -C "$d/a/t"; t1=$(date +%s.%N)
    while [ "$(find "$d/b/t" -type f 2>/dev/null | wc -l)" -lt "$files" ] && [ "$(echo "$(date +%s) - ${t1%.*} < 300" | bc)" = 1 ]; do sleep 0.2; done
    t2=$(date +%s.%N)
    printf 'round %d %s: tar x %.2f s, all %d files on B %.2f s after the start\n' "$r" "$bin" "$(echo "$t1 - $t0" | bc)" "$files" "$(echo "$t2 - $t0" | bc)"
    cluster_stop "$d"
    rm -rf "$d"
  done
done
