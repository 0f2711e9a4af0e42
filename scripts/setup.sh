#!/usr/bin/env bash
# Installs and starts everything the system and its tests need, idempotently:
# Debian packages (FUSE, RabbitMQ), a running broker on 127.0.0.1:5672.
# Safe to run again and again; every wait has a deadline and says what it waits for.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

need_pkgs=()
command -v fusermount3 >/dev/null 2>&1 || need_pkgs+=(fuse3)
command -v rabbitmq-server >/dev/null 2>&1 || need_pkgs+=(rabbitmq-server)
command -v gcc >/dev/null 2>&1 || need_pkgs+=(gcc)
command -v git >/dev/null 2>&1 || need_pkgs+=(git)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing Debian packages: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

[ -e /dev/fuse ] || { log "/dev/fuse is missing: FUSE cannot work on this machine"; exit 1; }

broker_up() { rabbitmqctl -q status >/dev/null 2>&1; }

if ! broker_up; then
  log "starting rabbitmq-server"
  # The package's post-install may have started a node already, or left a dead pid file.
  rabbitmq-server -detached >/dev/null 2>&1 || true
  deadline=$((SECONDS + 120))
  until broker_up; do
    if [ $SECONDS -ge $deadline ]; then
      log "RabbitMQ did not come up within 120 s; its log follows"
      tail -n 50 /var/log/rabbitmq/*.log 2>/dev/null || true
      exit 1
    fi
    sleep 1
  done
fi
rabbitmqctl -q await_startup --timeout 120 >/dev/null
# The broker's port must answer before anyone connects.
deadline=$((SECONDS + 60))
until (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; do
  [ $SECONDS -lt $deadline ] || { log "port 5672 does not answer"; exit 1; }
  sleep 1
done
log "RabbitMQ is up on 127.0.0.1:5672; FUSE is available"
