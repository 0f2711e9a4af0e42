# Sourced by bench scripts: `start_two_nodes BIN_DIR NAME` starts the manager and nodes a
# and b (mounts $W/a and $W/b, data $W/data-a and $W/data-b) on a fresh vhost of the
# local broker (scripts/setup.sh) and returns once both nodes are up. It sets W (a new
# work directory) and pids (manager, a, b); on exit everything is stopped, unmounted
# and removed, also on failure. `wait_for WHAT TENTHS COMMAND...` waits (at most TENTHS
# tenths of a second) until COMMAND succeeds, and fails the script if it never does.
wait_for() { # what, deadline in tenths, condition...
  local what=$1 tenths=$2; shift 2
  for _ in $(seq "$tenths"); do "$@" && return 0; sleep 0.1; done
  echo "timed out waiting for $what" >&2; exit 1
}

start_two_nodes() {
  local bin=$1 name=$2 n
  W=$(mktemp -d "/tmp/$name.XXXXXX")
  VH=$name-$$
  pids=()
  trap stop_two_nodes EXIT
  rabbitmqctl -q add_vhost "$VH" >/dev/null
  rabbitmqctl -q set_permissions -p "$VH" guest '.*' '.*' '.*' >/dev/null
  local broker="amqp://guest:guest@127.0.0.1:5672/$VH?heartbeat=10"
  "$bin/manager" serve --broker "$broker" --db "$W/manager.db" --http 127.0.0.1:0 >"$W/manager.log" 2>&1 &
  pids+=($!)
  for n in a b; do
    mkdir -p "$W/$n"
    "$bin/fs-node" --id "node-$n" --mount "$W/$n" --data "$W/data-$n" --broker "$broker" >"$W/node-$n.log" 2>&1 &
    pids+=($!)
  done
  for n in a b; do
    wait_for "node $n to start (log: $W/node-$n.log)" 300 test -f "$W/data-$n/node.url"
  done
}

stop_two_nodes() {
  local p m
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for m in "$W/a" "$W/b"; do mountpoint -q "$m" && umount -l "$m"; done
  rabbitmqctl -q delete_vhost "$VH" >/dev/null 2>&1 || true
  rm -rf "$W"
}
