#!/bin/bash
# What a node's store holds once old versions of a large file are kept (docs/benchmarks.md,
# session 21). For each build dir (holding fs-node, manager and syncctl): a fresh vhost,
# manager (keeping old versions, its default) and two nodes A and B mounted under a temp
# dir; a 256 MiB file of random bytes written on A until B has the same bytes, then edited
# in place five times (one byte each), each edit once B has the one before and four
# seconds later (a node writes a new version out whole two seconds after it is made); then
# the size of each node's blobs/ and patched/ and the old versions it keeps.
# With MODE=saved (session 22), each edit is instead a save as most programs do it: the
# file read, 1,000 random bytes inserted at 40 MiB * i, written to a new file in the
# mount and renamed over the old one (the bytes after the insertion move); the nodes run
# their GC every second, and the sizes are taken 70 s after the last edit.
# With MODE=twins (session 23), no edits: a copy of the file with 1,000 random bytes
# inserted at 100 MiB is written next to it (two current near-copies); the nodes run with
# SYNC_DEDUP_IDLE_SECS=${IDLE:-10}, the sizes are taken 80 s later, then (caches dropped)
# each file is read whole through A's mount twice, timed. (Session 24:) SIZE_MIB sets the
# file's size (default 256; the insertion is then at a third of it), and ON_DEMAND=1
# starts B with --on-demand and reads both files through B's mount before the wait (B
# fetches them into its cache).
# Usage: [MODE=saved|twins] [IDLE=secs] [SIZE_MIB=n] [ON_DEMAND=1] bench/scripts/versions-at-rest.sh BIN_DIR...   (needs scripts/setup.sh run)
set -eu
MODE=${MODE:-in-place} SIZE_MIB=${SIZE_MIB:-256}
[ $# -ge 1 ] || { echo "usage: $0 BIN_DIR..." >&2; exit 2; }
waitfor() { for _ in $(seq 1200); do if "$@"; then return 0; fi; sleep 0.1; done; echo "timed out: $*" >&2; return 1; }
for bin in "$@"; do
  d=$(mktemp -d) vhost=at-rest-$$-$RANDOM pids=()
  mkdir -p "$d/a" "$d/b"
  rabbitmqctl -q add_vhost "$vhost" && rabbitmqctl -q set_permissions -p "$vhost" guest '.*' '.*' '.*'
  broker="amqp://guest:guest@127.0.0.1:5672/$vhost?heartbeat=10"
  RUST_LOG=warn "$bin/manager" serve --broker "$broker" --db "$d/manager.db" >"$d/manager.log" 2>&1 & pids+=($!)
  for n in a b; do
    more=(); [ "$n" = b ] && [ -n "${ON_DEMAND:-}" ] && more=(--on-demand)
    SYNC_DEDUP_IDLE_SECS=${IDLE:-10} RUST_LOG=warn "$bin/fs-node" --id "node-$n" --mount "$d/$n" --data "$d/data-$n" --broker "$broker" --gc-every-secs 1 "${more[@]}" >"$d/node-$n.log" 2>&1 & pids+=($!)
  done
  for n in a b; do waitfor mountpoint -q "$d/$n"; done
  head -c $((SIZE_MIB << 20)) /dev/urandom > "$d/src.bin"
  cp "$d/src.bin" "$d/a/big.img"
  waitfor cmp -s "$d/a/big.img" "$d/b/big.img"
  if [ "$MODE" = twins ]; then
    python3 -c "import os; b = open('$d/src.bin', 'rb').read(); at = 100 * 2**20 if $SIZE_MIB == 256 else $SIZE_MIB * 2**20 // 3; open('$d/a/copy.img', 'wb').write(b[:at] + os.urandom(1000) + b[at:])"
    waitfor cmp -s "$d/a/copy.img" "$d/b/copy.img"
    sleep 80
    echo "== $bin ($MODE, idle ${IDLE:-10} s, $SIZE_MIB MiB${ON_DEMAND:+, B on demand})"
    for n in a b; do
      echo "node $n: blobs $(du -sm "$d/data-$n/blobs" | cut -f1) MiB, patched $(du -sm "$d/data-$n/patched" | cut -f1) MiB"
    done
    for f in big.img copy.img; do
      sync; echo 3 > /proc/sys/vm/drop_caches
      for r in 1 2; do
        s0=$(date +%s.%N); cat "$d/a/$f" > /dev/null; s1=$(date +%s.%N)
        echo "read $f through A's mount, round $r: $(echo "$s1 - $s0" | bc) s"
      done
    done
  fi
  for i in 1 2 3 4 5; do
    [ "$MODE" = twins ] && break
    if [ "$MODE" = saved ]; then
      python3 -c "import os; b = open('$d/a/big.img', 'rb').read(); at = $i * 40 * 2**20; open('$d/a/.big.img.tmp', 'wb').write(b[:at] + os.urandom(1000) + b[at:]); os.rename('$d/a/.big.img.tmp', '$d/a/big.img')"
    else
      python3 -c "import os; f = os.open('$d/a/big.img', os.O_WRONLY); os.pwrite(f, bytes([$i]), $i * 40 * 2**20 + $i); os.close(f)"
    fi
    waitfor cmp -s "$d/a/big.img" "$d/b/big.img"
    sleep 4
  done
  # (saved: a version looked at before the next one's chunk list was made is looked at
  # again a minute later)
  if [ "$MODE" = saved ]; then sleep 70; elif [ "$MODE" = in-place ]; then sleep 5; fi
  [ "$MODE" = twins ] || echo "== $bin ($MODE)"
  for n in a b; do
    [ "$MODE" = twins ] && break
    echo "node $n: blobs $(du -sm "$d/data-$n/blobs" | cut -f1) MiB, patched $(du -sm "$d/data-$n/patched" | cut -f1) MiB; $("$bin/syncctl" --data "$d/data-$n" status | grep '^versions:')"
  done
  for n in a b; do umount -l "$d/$n" || true; done
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  if [ -n "${KEEP_DIRS:-}" ]; then echo "kept $d"; else rm -rf "$d"; fi
done
