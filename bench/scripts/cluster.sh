# Sourced by the bench scripts: a cluster of its own on this machine's RabbitMQ.
# cluster_start BIN DIR NODE... starts a fresh vhost, the manager of BIN and a node per
# name (mounted at DIR/NAME, data in DIR/data-NAME) and waits until each serves; the
# pids go to CLUSTER_PIDS (manager first, then the nodes in order). cluster_stop DIR
# stops them, unmounts and removes the vhost. on_one_node_clusters FN BIN_DIR... runs
# `FN BIN DIR` for each build dir against a fresh cluster of one node (a) of its own;
# KEEP_LOGS=DIR keeps each run's manager and node logs in DIR/<build dir's parent>/.
# registry_archive FILE writes a tar of the local cargo registry's unpacked crates (real
# source files) to FILE, the archive the tool benchmarks unpack by default.
cluster_start() {
  local bin=$1 dir=$2 n
  shift 2
  CLUSTER_VHOST=bench-$$-$RANDOM
  rabbitmqctl -q add_vhost "$CLUSTER_VHOST" && rabbitmqctl -q set_permissions -p "$CLUSTER_VHOST" guest '.*' '.*' '.*'
  local broker="amqp://guest:guest@127.0.0.1:5672/$CLUSTER_VHOST?heartbeat=10"
  RUST_LOG=warn "$bin/manager" serve --broker "$broker" --db "$dir/manager.db" >"$dir/manager.log" 2>&1 &
  CLUSTER_PIDS=($!) CLUSTER_NODES=("$@")
  for n in "$@"; do
    mkdir -p "$dir/$n"
    RUST_LOG=warn "$bin/fs-node" --id "node-$n" --mount "$dir/$n" --data "$dir/data-$n" --broker "$broker" >"$dir/node-$n.log" 2>&1 &
    CLUSTER_PIDS+=($!)
  done
  for n in "$@"; do for _ in $(seq 300); do [ -f "$dir/data-$n/node.url" ] && break; sleep 0.1; done; done
}

cluster_stop() {
  local dir=$1 n
  kill "${CLUSTER_PIDS[@]}" 2>/dev/null; wait "${CLUSTER_PIDS[@]}" 2>/dev/null
  for n in "${CLUSTER_NODES[@]}"; do umount "$dir/$n" 2>/dev/null || true; done
  rabbitmqctl -q delete_vhost "$CLUSTER_VHOST"
}

on_one_node_clusters() {
  local fn=$1 bin d
  shift
  for bin in "$@"; do
    bin=$(realpath "$bin") d=$(mktemp -d)
    cluster_start "$bin" "$d" a
    "$fn" "$bin" "$d"
    cluster_stop "$d"
    if [ -n "${KEEP_LOGS:-}" ]; then
      mkdir -p "$KEEP_LOGS/$(basename "$(dirname "$bin")")" && cp "$d"/*.log "$KEEP_LOGS/$(basename "$(dirname "$bin")")/"
    fi
    rm -rf "$d"
  done
}

registry_archive() {
  tar cf "$1" -C "$(ls -d ~/.cargo/registry/src/*/ | head -1)" .
}
