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
source "$(dirname "$0")/two-nodes.sh"
start_two_nodes "$BIN" ops-cpu
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
