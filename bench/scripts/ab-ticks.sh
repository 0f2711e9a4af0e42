#!/bin/bash
# CPU per file operation of every process of a cluster, builds taking turns (docs/benchmarks.md,
# session 17). For each build dir (holding fs-node and manager) and each round: a fresh
# vhost, manager and two nodes A and B mounted under a temp dir; N files of 4 KiB (each its
# own content) created, written and closed in A's mount until B lists them all, then
# deleted until B's directory is empty. Prints the rates, how long B took after the first
# operation, and the CPU ticks (1/100 s, utime+stime from /proc/<pid>/stat) per 1,000
# operations of the manager, node A, node B and RabbitMQ (beam.smp), per phase.
# Usage: bench/scripts/ab-ticks.sh [-n N] [-r ROUNDS] BIN_DIR...   (needs scripts/setup.sh run)
set -u
N=5000 ROUNDS=2
while getopts n:r: o; do case $o in n) N=$OPTARG ;; r) ROUNDS=$OPTARG ;; *) exit 2 ;; esac; done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { echo "usage: $0 [-n N] [-r ROUNDS] BIN_DIR..." >&2; exit 2; }
# The broker on 5672 (the test suite's three-node cluster may be running beside it).
RABBIT=$(ss -Hltnp 'sport = :5672' | grep -o 'beam.smp",pid=[0-9]*' | head -1 | cut -d= -f2)
[ -n "$RABBIT" ] || { echo "RabbitMQ is not listening on 5672: scripts/setup.sh" >&2; exit 1; }

one_run() {
  local bin=$1 d vhost pids=()
  d=$(mktemp -d) vhost=ab-ticks-$$-$RANDOM
  mkdir -p "$d/a" "$d/b"
  rabbitmqctl -q add_vhost "$vhost" && rabbitmqctl -q set_permissions -p "$vhost" guest '.*' '.*' '.*'
  local broker="amqp://guest:guest@127.0.0.1:5672/$vhost?heartbeat=10"
  RUST_LOG=warn "$bin/manager" serve --broker "$broker" --db "$d/manager.db" >"$d/manager.log" 2>&1 & pids+=($!)
  for n in a b; do
    RUST_LOG=warn "$bin/fs-node" --id "node-$n" --mount "$d/$n" --data "$d/data-$n" --broker "$broker" >"$d/node-$n.log" 2>&1 & pids+=($!)
  done
  for n in a b; do for _ in $(seq 300); do [ -f "$d/data-$n/node.url" ] && break; sleep 0.1; done; done
  mkdir "$d/a/x"
  for _ in $(seq 100); do [ -d "$d/b/x" ] && break; sleep 0.1; done
  ticks() { for p in "${pids[@]}" "$RABBIT"; do awk '{printf "%d ", $14+$15}' "/proc/$p/stat"; done; }
  local t0 t1 t2 out
  t0=$(ticks)
  out=$(python3 - "$d/a/x" "$N" "$d/b/x" create <<'PY'
import os, sys, time
d, n, other = sys.argv[1], int(sys.argv[2]), sys.argv[3]
blk = bytearray(b'\x5a' * 4096); t = time.time()
for i in range(n):
    blk[:8] = i.to_bytes(8, 'little')
    with open(f"{d}/f{i:06}", "wb") as f: f.write(blk)
rate = n / (time.time() - t)
while len(os.listdir(other)) < n and time.time() - t < 600: time.sleep(0.02)
print(f"creates {rate:.0f}/s, on B after {time.time() - t:.2f} s;")
PY
)
  t1=$(ticks)
  out="$out $(python3 - "$d/a/x" "$N" "$d/b/x" <<'PY'
import os, sys, time
d, n, other = sys.argv[1], int(sys.argv[2]), sys.argv[3]
t = time.time()
for i in range(n): os.unlink(f"{d}/f{i:06}")
rate = n / (time.time() - t)
while len(os.listdir(other)) > 0 and time.time() - t < 600: time.sleep(0.02)
print(f"deletes {rate:.0f}/s, on B after {time.time() - t:.2f} s")
PY
)"
  t2=$(ticks)
  kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null
  umount "$d/a" "$d/b" 2>/dev/null
  rabbitmqctl -q delete_vhost "$vhost"
  rm -rf "$d"
  python3 -c "
import sys
a, b, c = [list(map(int, x.split())) for x in sys.argv[1:4]]; n = int(sys.argv[4])
names = ['manager', 'A', 'B', 'rabbitmq']
per = lambda x, y: ' '.join(f'{k}={(y[i] - x[i]) * 1000 / n:.0f}' for i, k in enumerate(names)) + f' total={(sum(y) - sum(x)) * 1000 / n:.0f}'
print(sys.argv[5], '| ticks per 1,000 creates:', per(a, b), '| per 1,000 deletes:', per(b, c))
" "$t0" "$t1" "$t2" "$N" "$out"
}

for r in $(seq "$ROUNDS"); do
  for bin in "$@"; do
    echo "$bin round $r: $(one_run "$(realpath "$bin")")"
  done
done
