#!/bin/bash
# CPU of every process of a two-node cluster per create and per delete, and the rates a
# Python loop sees through node A's mount (docs/benchmarks.md, session 25).
# Usage: bench/scripts/ops-cpu.sh BIN_DIR TAG [FILES]
#   BIN_DIR holds manager and fs-node; TAG names the run in the output line.
# Starts the manager and nodes a and b on a fresh vhost of the local broker
# (scripts/setup.sh), creates FILES files of 4 KiB in a's mount, waits until b lists them
# all, deletes them, waits until b lists none, and prints the rates and the CPU ticks
# (1/100 s, utime+stime from /proc/PID/stat) per 1,000 operations of the manager, node a,
# node b and the broker. Everything is stopped and unmounted at the end (also on failure).
# For an A/B, alternate two BIN_DIRs: for r in 1 2 3; do ... OLD old; ... NEW new; done
set -euo pipefail
BIN=$(realpath "$1") TAG=$2 N=${3:-10000}
W=$(mktemp -d /tmp/ops-cpu.XXXXXX)
VH=ops-cpu-$$
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for m in "$W/a" "$W/b"; do mountpoint -q "$m" && umount -l "$m"; done
  rabbitmqctl -q delete_vhost "$VH" >/dev/null 2>&1 || true
  rm -rf "$W"
}
trap cleanup EXIT
rabbitmqctl -q add_vhost "$VH" >/dev/null
rabbitmqctl -q set_permissions -p "$VH" guest '.*' '.*' '.*' >/dev/null
B="amqp://guest:guest@127.0.0.1:5672/$VH?heartbeat=10"
"$BIN/manager" serve --broker "$B" --db "$W/manager.db" --http 127.0.0.1:0 >"$W/manager.log" 2>&1 &
pids+=($!)
for n in a b; do
  mkdir -p "$W/$n"
  "$BIN/fs-node" --id "node-$n" --mount "$W/$n" --data "$W/data-$n" --broker "$B" >"$W/node-$n.log" 2>&1 &
  pids+=($!)
done
wait_for() { # what, deadline in tenths, condition...
  local what=$1 tenths=$2; shift 2
  for _ in $(seq "$tenths"); do "$@" && return 0; sleep 0.1; done
  echo "timed out waiting for $what" >&2; exit 1
}
for n in a b; do wait_for "node $n" 300 test -f "$W/data-$n/node.url"; done
mkdir "$W/a/d"
procs="${pids[*]} $(pgrep -x beam.smp | head -n1)"
snap() { for p in $procs; do awk '{printf "%d ", $14+$15}' "/proc/$p/stat"; done; }
per_1000() { local -a x=($1) y=($2); for i in 0 1 2 3; do printf '%d ' $(( (y[i] - x[i]) * 1000 / N )); done; }
count_b() { find "$W/b/d" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
b_has_all() { [ "$(count_b)" -ge "$N" ]; }
b_has_none() { [ "$(count_b)" -eq 0 ]; }
loop() { python3 - "$W/a/d" "$N" "$1" <<'PY'
import os, sys, time
d, n, op = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = b'x' * 4096
t = time.perf_counter()
for i in range(n):
    p = os.path.join(d, f'f{i}')
    if op == 'create':
        fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644); os.write(fd, data); os.close(fd)
    else:
        os.unlink(p)
print(f'{n / (time.perf_counter() - t):.0f}')
PY
}
s0=$(snap)
creates=$(loop create)
wait_for "b to list $N files" 1200 b_has_all
s1=$(snap)
deletes=$(loop delete)
wait_for "b to list none" 1200 b_has_none
s2=$(snap)
echo "$TAG | creates/s $creates | deletes/s $deletes | ticks per 1,000 (manager, a, b, broker): creates $(per_1000 "$s0" "$s1")| deletes $(per_1000 "$s1" "$s2")"
