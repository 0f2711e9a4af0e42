#!/bin/bash
# A/B of two builds on the metadata bench (docs/benchmarks.md, session 16): CPU ticks
# (1/100 s, utime+stime from /proc/<pid>/stat, sampled every second) of every process of
# the cluster per 1,000 creates, summed from the cluster's start until bindfs starts
# (the mount's create loop, its sync to node B, and the native loop), and the create
# rates the bench prints. Taking turns OLD, NEW, OLD, NEW.
# Usage: bench/scripts/meta-ab.sh OLD_RELEASE_DIR [NEW_RELEASE_DIR]  (each holding
# fs-node and manager; NEW defaults to target/release; the bench binary is
# target/release/syncfs-bench).
set -u
cd "$(dirname "$0")/../.."
OLD=$1 NEW=${2:-target/release} FILES=${BENCH_META_FILES:-5000}
sample() {
  declare -A last
  while true; do
    local out=""
    for p in $(pgrep -f 'fs-node|manager|beam.smp|syncfs-bench|bindfs'); do
      read -r name t <<<"$(awk '{gsub(/[()]/,"",$2); print $2, $14+$15}' /proc/$p/stat 2>/dev/null)"
      [ -z "$t" ] && continue
      local d=$(( t - ${last[$p]:-$t} )); last[$p]=$t
      [ $d -gt 0 ] && out="$out $name/$p:$d"
    done
    echo "$out"; sleep 1
  done
}
for round in 1 2; do
  for build in OLD NEW; do
    dir=${!build}
    log=$(mktemp)
    sample > "$log" 2>&1 &
    sampler=$!
    rates=$(SYNC_BIN_DIR=$(realpath "$dir") BENCH_ONLY=meta BENCH_META_FILES=$FILES target/release/syncfs-bench 2>&1 | grep -E "create \+" | cut -d'|' -f3-5)
    kill $sampler
    ticks=$(awk -v n="$FILES" '/bindfs/{exit} {for(i=1;i<=NF;i++){split($i,a,":"); split(a[1],b,"/"); k=b[1]; if(k=="fs-node"){ if(!(b[2] in id)){id[b[2]]=++c}; k="node" id[b[2]]}; t[k]+=a[2]}} END{for(k in t) printf "%s=%.1f ", k, t[k]*1000/n}' "$log")
    rm -f "$log"
    echo "$build round $round | creates/s mount, native, bindfs: $rates | ticks per 1,000 creates: $ticks"
  done
done
