#!/usr/bin/env bash
# Installs and starts everything the system and its tests need, idempotently:
# Debian packages (FUSE, RabbitMQ, openssl, systemd's tools), a running broker on 127.0.0.1:5672 (amqp)
# and 127.0.0.1:5671 (amqps, with a certificate from a local test CA in
# /etc/rabbitmq/syncfs-tls/ca.pem).
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
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
# systemd-analyze checks the package's units (tests/tests/package.rs); systemd is not
# started by installing it.
command -v systemd-analyze >/dev/null 2>&1 || need_pkgs+=(systemd)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing Debian packages: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

[ -e /dev/fuse ] || { log "/dev/fuse is missing: FUSE cannot work on this machine"; exit 1; }

# TLS for amqps://: a local CA and a server certificate for localhost / 127.0.0.1, made
# once. A real deployment uses its own certificates (docs/deploy.md).
tls_dir=/etc/rabbitmq/syncfs-tls
if [ ! -s "$tls_dir/server.pem" ] || [ ! -s "$tls_dir/ca.pem" ]; then
  log "making a test CA and a broker certificate in $tls_dir"
  mkdir -p "$tls_dir"
  (
    cd "$tls_dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=syncfs local test CA" -keyout ca.key -out ca.pem 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
    printf '%s\n' 'subjectAltName=DNS:localhost,IP:127.0.0.1' 'basicConstraints=CA:FALSE' \
      'keyUsage=digitalSignature,keyEncipherment' 'extendedKeyUsage=serverAuth' >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 -extfile server.ext -out server.pem 2>/dev/null
    rm -f server.csr server.ext ca.srl
  )
  chown -R rabbitmq:rabbitmq "$tls_dir" 2>/dev/null || true
  chmod 600 "$tls_dir/ca.key" "$tls_dir/server.key"
  chmod 644 "$tls_dir/ca.pem" "$tls_dir/server.pem"
fi
conf=/etc/rabbitmq/rabbitmq.conf
if ! grep -q '^# syncfs: amqps' "$conf" 2>/dev/null; then
  log "adding the amqps listener (127.0.0.1:5671) to $conf"
  mkdir -p /etc/rabbitmq
  {
    echo "# syncfs: amqps listener for scripts/setup.sh (loopback only)"
    echo "listeners.ssl.1 = 127.0.0.1:5671"
    echo "ssl_options.cacertfile = $tls_dir/ca.pem"
    echo "ssl_options.certfile = $tls_dir/server.pem"
    echo "ssl_options.keyfile = $tls_dir/server.key"
    echo "ssl_options.verify = verify_none"
    echo "ssl_options.fail_if_no_peer_cert = false"
  } >>"$conf"
fi

# The largest message the broker accepts (RabbitMQ's default is 128 MiB). It is
# wire::BROKER_MAX_MESSAGE_BYTES; the manager sends a sync reply in pages of at most
# wire::SYNC_PAGE_BYTES (4 MiB), well below it, and every other message is far smaller.
max_message_bytes=16777216
if ! grep -qx "max_message_size = $max_message_bytes" "$conf" 2>/dev/null; then
  log "setting max_message_size = $max_message_bytes in $conf"
  mkdir -p /etc/rabbitmq
  [ -f "$conf" ] && sed -i '/^max_message_size *=/d; /^# syncfs: largest message/d' "$conf"
  {
    echo "# syncfs: largest message the broker accepts (scripts/setup.sh)"
    echo "max_message_size = $max_message_bytes"
  } >>"$conf"
fi

broker_up() { rabbitmqctl -q status >/dev/null 2>&1; }
tls_listening() { rabbitmq-diagnostics -q listeners 2>/dev/null | grep -q 'port: 5671'; }

start_broker() {
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
}

if ! broker_up; then
  start_broker
fi
rabbitmqctl -q await_startup --timeout 120 >/dev/null
if ! tls_listening; then
  # Started before the amqps listener was configured: restart it once with the config.
  log "restarting RabbitMQ to open the amqps listener"
  rabbitmqctl -q shutdown >/dev/null 2>&1 || true
  start_broker
  rabbitmqctl -q await_startup --timeout 120 >/dev/null
  tls_listening || { log "RabbitMQ did not open 127.0.0.1:5671; its log follows"; tail -n 50 /var/log/rabbitmq/*.log 2>/dev/null || true; exit 1; }
fi
rabbitmqctl -q await_startup --timeout 120 >/dev/null
# rabbitmq.conf is read at start. A running broker that has another limit takes the new
# one at once: every channel opened from now on reads it, so nothing is restarted under
# the feet of whoever is connected. Only if that does not take is the broker restarted.
running_max() { rabbitmqctl -q eval 'application:get_env(rabbit, max_message_size).' 2>/dev/null; }
if [ "$(running_max)" != "{ok,$max_message_bytes}" ]; then
  log "applying max_message_size = $max_message_bytes to the running broker"
  rabbitmqctl -q eval "application:set_env(rabbit, max_message_size, $max_message_bytes)." >/dev/null 2>&1 || true
  if [ "$(running_max)" != "{ok,$max_message_bytes}" ]; then
    log "restarting RabbitMQ to apply max_message_size"
    rabbitmqctl -q shutdown >/dev/null 2>&1 || true
    start_broker
    rabbitmqctl -q await_startup --timeout 120 >/dev/null
  fi
fi
# The broker's port must answer before anyone connects.
deadline=$((SECONDS + 60))
for port in 5672 5671; do
  until (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { log "port $port does not answer"; exit 1; }
    sleep 1
  done
done
log "RabbitMQ is up on 127.0.0.1:5672 (amqp) and 5671 (amqps); FUSE is available"
