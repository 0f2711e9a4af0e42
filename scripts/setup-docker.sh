#!/usr/bin/env bash
# Makes a Docker daemon answer on /var/run/docker.sock, idempotently:
# installs Debian's docker.io if dockerd is missing, starts `dockerd` in the background
# if no daemon answers, and waits for it with a deadline. Safe to run again and again.
# The node image is built FROM scratch, so no image registry is ever needed.
set -euo pipefail

log() { printf '[setup-docker] %s\n' "$*" >&2; }

DEADLINE_S=${SYNC_DOCKER_DEADLINE_S:-90}
LOG_FILE=${SYNC_DOCKERD_LOG:-/var/log/syncfs-dockerd.log}

if ! command -v dockerd >/dev/null 2>&1; then
  log "installing Debian package docker.io"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  # The package's post-install may try to start the service through systemd; without
  # systemd that fails harmlessly and we start dockerd ourselves below.
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends docker.io iptables >/dev/null
fi

# Prefer a docker client that matches the daemon when Debian's is installed.
docker_cli() {
  if [ -x /usr/bin/docker ]; then /usr/bin/docker "$@"; else docker "$@"; fi
}

daemon_up() { docker_cli version --format '{{.Server.Version}}' >/dev/null 2>&1; }

if ! daemon_up; then
  if pgrep -x dockerd >/dev/null 2>&1; then
    log "dockerd is running but does not answer yet; waiting"
  else
    log "starting dockerd in the background (log: $LOG_FILE)"
    # A dead daemon leaves its pid file behind and the next start refuses to run.
    rm -f /var/run/docker.pid
    nohup dockerd >>"$LOG_FILE" 2>&1 </dev/null &
  fi
  deadline=$((SECONDS + DEADLINE_S))
  until daemon_up; do
    if [ $SECONDS -ge $deadline ]; then
      log "dockerd did not answer within ${DEADLINE_S} s; the end of its log follows"
      tail -n 40 "$LOG_FILE" 2>/dev/null || true
      exit 1
    fi
    sleep 1
  done
fi

[ -e /dev/fuse ] || { log "/dev/fuse is missing: node containers cannot mount FUSE"; exit 1; }
log "Docker daemon $(docker_cli version --format '{{.Server.Version}}') answers on /var/run/docker.sock"
