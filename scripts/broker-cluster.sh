#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, for the tests that stop a broker node
# under load (tests/tests/broker_cluster.rs): broker nodes syncfs-rmq1..3@localhost,
# AMQP on 127.0.0.1:5681..5683 (loopback only), each with its own data directory under
# /var/lib/rabbitmq/syncfs-cluster. It runs beside the single broker of scripts/setup.sh
# and shares only the Erlang cookie and epmd with it.
#   scripts/broker-cluster.sh start     start the three and join them (idempotent)
#   scripts/broker-cluster.sh stop      stop all three
#   scripts/broker-cluster.sh reset     stop, remove their data, start afresh
#   scripts/broker-cluster.sh alone     start a fourth broker node, syncfs-rmq4@localhost on
#                                       127.0.0.1:5684, in no cluster: for the tests that set
#                                       off its memory alarm (tests/tests/broker_alarm.rs),
#                                       which would block every other test's broker
set -euo pipefail

base=/var/lib/rabbitmq/syncfs-cluster
ports=(5681 5682 5683 5684)
name() { echo "syncfs-rmq$1@localhost"; }
ctl() { local i=$1; shift; rabbitmqctl -q -n "$(name "$i")" "$@"; }
up() { ctl "$1" status >/dev/null 2>&1; }
log() { echo "broker-cluster: $*" >&2; }

# Launches broker node $1 (detached) unless it runs; `wait_node` waits for it. All three
# are launched before any is waited for: a broker node restarted after the whole cluster
# stopped waits for the other members' tables before it boots (Mnesia), so starting
# and awaiting them one by one would wait on a node that is not started yet.
launch_node() {
  local i=$1 port=${ports[$(($1 - 1))]} dir=$base/n$1
  up "$i" && return 0
  mkdir -p "$dir"
  cat >"$dir/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$port
max_message_size = 16777216
CONF
  echo '[].' >"$dir/enabled_plugins"
  chown -R rabbitmq:rabbitmq "$base"
  log "starting $(name "$i") on 127.0.0.1:$port"
  su rabbitmq -s /bin/sh -c "cd /var/lib/rabbitmq && HOME=/var/lib/rabbitmq \
    RABBITMQ_NODENAME=$(name "$i") RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$port \
    RABBITMQ_DIST_PORT=$((port + 20000)) RABBITMQ_CONFIG_FILE=$dir/rabbitmq.conf \
    RABBITMQ_MNESIA_BASE=$dir/mnesia RABBITMQ_LOG_BASE=$dir/log RABBITMQ_PID_FILE=$dir/pid \
    RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins \
    /usr/lib/rabbitmq/bin/rabbitmq-server -detached" >/dev/null 2>&1 9>&- || true
}

wait_node() {
  local i=$1 dir=$base/n$1
  for _ in $(seq 1 240); do
    up "$i" && ctl "$i" await_startup --timeout 120 >/dev/null 2>&1 && return 0
    sleep 1
  done
  log "$(name "$i") did not start; its log follows"
  tail -n 60 "$dir"/log/*.log >&2 2>/dev/null || true
  exit 1
}

members() { ctl 1 cluster_status --formatter json 2>/dev/null | python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin).get("running_nodes", [])))' 2>/dev/null || true; }

join() {
  local i=$1
  members | grep -q "$(name "$i")" && return 0
  log "joining $(name "$i") to $(name 1)"
  ctl "$i" stop_app >/dev/null
  ctl "$i" reset >/dev/null
  ctl "$i" join_cluster "$(name 1)" >/dev/null
  ctl "$i" start_app >/dev/null
  ctl "$i" await_startup --timeout 120 >/dev/null
}

start() {
  command -v rabbitmq-server >/dev/null || { log "rabbitmq-server is not installed: run scripts/setup.sh first"; exit 1; }
  # One start at a time (tests running in parallel each ask for the cluster). The broker
  # nodes are launched without this descriptor (`9>&-`): one they inherited would hold
  # the lock for as long as they run, and every later start would wait forever.
  exec 9>/run/syncfs-broker-cluster.lock
  flock 9
  for i in 1 2 3; do launch_node "$i"; done
  for i in 1 2 3; do wait_node "$i"; done
  join 2
  join 3
  log "running: $(members)"
}

# The fourth broker node, alone (idempotent).
start_alone() {
  command -v rabbitmq-server >/dev/null || { log "rabbitmq-server is not installed: run scripts/setup.sh first"; exit 1; }
  exec 9>/run/syncfs-broker-alone.lock
  flock 9
  launch_node 4
  wait_node 4
}

stop() {
  for i in 4 3 2 1; do
    if up "$i"; then ctl "$i" stop >/dev/null 2>&1 || true; fi
  done
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  reset) stop; rm -rf "$base"; start ;;
  alone) start_alone ;;
  *) echo "usage: $0 start|stop|reset|alone" >&2; exit 2 ;;
esac
