#!/usr/bin/env bash
# Installs moto_server (an EC2-compatible endpoint used by the EC2 provisioning tests)
# into its own virtualenv, idempotently, and prints the path of moto_server on stdout.
# Safe to run again and again: an existing venv that already imports moto is kept.
set -euo pipefail

log() { printf '[setup-moto] %s\n' "$*" >&2; }

VENV=${SYNC_MOTO_VENV:-/opt/syncfs-moto}
# moto 5 is the line whose server mode and IAM authentication the tests were written against.
MOTO_SPEC=${SYNC_MOTO_SPEC:-moto[server]>=5,<6}

if ! "$VENV/bin/python" -c 'import moto, boto3' >/dev/null 2>&1; then
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    log "installing Debian package python3-venv"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends python3-venv >/dev/null
  fi
  log "creating virtualenv $VENV with $MOTO_SPEC"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "$MOTO_SPEC"
fi
[ -x "$VENV/bin/moto_server" ] || { log "moto_server missing in $VENV/bin"; exit 1; }
log "moto $("$VENV/bin/python" -c 'import moto; print(moto.__version__)') in $VENV"
echo "$VENV/bin/moto_server"
