#!/usr/bin/env bash
# Runs the whole system on this machine: RabbitMQ, the manager, and two nodes mounted at
# ./demo/a and ./demo/b. Write in one mount, watch it appear in the other. Ctrl-C stops
# everything and unmounts.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEMO=$ROOT/demo
VHOST=syncfs-demo
log() { printf '[demo] %s\n' "$*" >&2; }

scripts/setup.sh
log "building (release, without the EC2 client: see docs/provisioning.md)"
cargo build --release -p manager -p fs-node
BIN=$ROOT/target/release

rabbitmqctl -q add_vhost "$VHOST" 2>/dev/null || true
rabbitmqctl -q set_permissions -p "$VHOST" guest '.*' '.*' '.*'
BROKER="amqp://guest:guest@127.0.0.1:5672/$VHOST?heartbeat=10"
mkdir -p "$DEMO"

pids=()
cleanup() {
  log "stopping"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for m in "$DEMO/a" "$DEMO/b"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

# The dashboard on the first free port from 8080.
HTTP_PORT=8080
while (exec 3<>"/dev/tcp/127.0.0.1/$HTTP_PORT") 2>/dev/null; do HTTP_PORT=$((HTTP_PORT + 1)); done
HTTP_ARGS=(--http "127.0.0.1:$HTTP_PORT")
"$BIN/manager" serve --broker "$BROKER" --db "$DEMO/manager.db" "${HTTP_ARGS[@]}" >"$DEMO/manager.log" 2>&1 &
pids+=($!)
for n in a b; do
  "$BIN/fs-node" --id "node-$n" --mount "$DEMO/$n" --data "$DEMO/data-$n" --broker "$BROKER" >"$DEMO/node-$n.log" 2>&1 &
  pids+=($!)
done
for n in a b; do
  for _ in $(seq 1 300); do [ -f "$DEMO/data-$n/node.url" ] && break; sleep 0.1; done
  [ -f "$DEMO/data-$n/node.url" ] || { log "node-$n did not start; see $DEMO/node-$n.log"; exit 1; }
done

cat <<MSG
The system is running:
  broker   amqp://127.0.0.1:5672 (vhost $VHOST)
  manager  $DEMO/manager.db   (logs: $DEMO/manager.log)
  dashboard http://127.0.0.1:$HTTP_PORT/  (operator token: $BIN/manager credentials show --db $DEMO/manager.db)
  node-a   mounted at $DEMO/a
  node-b   mounted at $DEMO/b

Try:  echo hello > $DEMO/a/hello.txt && sleep 1 && cat $DEMO/b/hello.txt
      $BIN/syncctl --data $DEMO/data-a status
      $BIN/manager status --db $DEMO/manager.db
Ctrl-C stops everything.
MSG
wait -n "${pids[@]}" || true
log "a process exited; see the logs in $DEMO"
