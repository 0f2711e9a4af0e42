#!/usr/bin/env bash
# Installs Debian's vagrant (only to run `vagrant validate` on the repository's
# Vagrantfile in tests/tests/vagrantfile.rs; no provider is needed for that). Idempotent.
set -euo pipefail
if ! command -v vagrant >/dev/null 2>&1; then
  printf '[setup-vagrant] installing Debian package vagrant\n' >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends vagrant >/dev/null
fi
printf '[setup-vagrant] %s\n' "$(vagrant --version)" >&2
