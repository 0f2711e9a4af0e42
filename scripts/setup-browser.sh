#!/usr/bin/env bash
# Installs what the dashboard's browser test needs, idempotently: Debian's chromium
# (/usr/bin/chromium), Node.js and npm, and playwright-core from the npm registry into
# tests/browser/node_modules (pinned by tests/browser/package-lock.json).
# Playwright's own browser download is never used: the test drives Debian's chromium.
set -euo pipefail

log() { printf '[setup-browser] %s\n' "$*" >&2; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

need_pkgs=()
[ -x /usr/bin/chromium ] || need_pkgs+=(chromium)
command -v node >/dev/null 2>&1 || need_pkgs+=(nodejs)
command -v npm >/dev/null 2>&1 || need_pkgs+=(npm)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing Debian packages: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

cd "$here/tests/browser"
if [ ! -f node_modules/playwright-core/package.json ]; then
  log "installing playwright-core into tests/browser/node_modules"
  # No browser download: playwright-core never fetches one, and this keeps it that way.
  export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
  if [ -f package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
  else
    npm install --no-audit --no-fund --loglevel=error
  fi
fi
log "chromium $(/usr/bin/chromium --version 2>/dev/null | awk '{print $2}') and playwright-core $(node -p "require('./node_modules/playwright-core/package.json').version") are ready"
