#!/bin/bash
# A/B of two manager binaries on the demo cluster (docs/benchmarks.md, session 15): 5,000
# files of 4 KiB, each its own content, made through demo/a; then rm -r of them; prints the
# rm's time, when demo/b is empty, and the manager's CPU (utime+stime) over that.
# Usage: run scripts/demo.sh once (it makes the vhost and builds), stop it, then start its
# two nodes by hand (target/release/fs-node --id node-a --mount demo/a --data demo/data-a
# --broker 'amqp://guest:guest@127.0.0.1:5672/syncfs-demo?heartbeat=10', and node-b);
# copy the two manager builds to /tmp/manager-before and /tmp/manager-after; run this.
cd /work/main
B='amqp://guest:guest@127.0.0.1:5672/syncfs-demo?heartbeat=10'
run() {
  local bin=$1
  pkill -f "^/tmp/manager-(before|after) serve"; pkill -f "^/tmp/tgt-fp/release/manager serve"; sleep 1
  (setsid nohup $bin serve --broker "$B" --db demo/manager.db --http 127.0.0.1:8080 > /tmp/mgr-ab.log 2>&1 &)
  sleep 2
  local mp=$(pgrep -f "^$bin serve" | head -1)
  python3 -c "
import os
d='demo/a/del'; os.makedirs(d, exist_ok=True)
for i in range(5000):
    open(f'{d}/f{i:05d}','wb').write(os.urandom(4096))
"
  for i in $(seq 1 300); do [ "$(ls demo/b/del 2>/dev/null | wc -l)" = "5000" ] && break; sleep 0.5; done
  sleep 2
  local c0=$(awk '{print $14+$15}' /proc/$mp/stat)
  local t0=$(date +%s.%N)
  rm -r demo/a/del
  local t1=$(date +%s.%N)
  for i in $(seq 1 600); do [ ! -e demo/b/del ] && break; sleep 0.05; done
  local t2=$(date +%s.%N)
  local c1=$(awk '{print $14+$15}' /proc/$mp/stat)
  echo "$(basename $bin): rm $(echo "$t1 - $t0" | bc) s, on b $(echo "$t2 - $t0" | bc) s, manager CPU $(( (c1 - c0) * 10 )) ms"
}
for round in 1 2; do run /tmp/manager-before; run /tmp/manager-after; done
