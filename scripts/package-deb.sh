#!/usr/bin/env bash
# Builds the Debian package target/debian/syncfs_<version>_<arch>.deb: the binaries
# (manager without the EC2 client; docs/provisioning.md), systemd units, default settings
# (conffiles), man pages and shell completions made from the flag definitions.
# Usage: scripts/package-deb.sh   (prints the package's path last)
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[package-deb] %s\n' "$*" >&2; }

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ARCH=$(dpkg --print-architecture)
TARGET=${CARGO_TARGET_DIR:-target}
# PACKAGE_BIN_DIR: package binaries built already (the package test uses the debug ones).
if [ -n "${PACKAGE_BIN_DIR:-}" ]; then
  BIN=$PACKAGE_BIN_DIR
else
  log "building release binaries"
  cargo build --release -p manager -p fs-node >&2
  BIN=$TARGET/release
fi

ROOT=${PACKAGE_OUT_DIR:-$TARGET/debian}/syncfs_${VERSION}_${ARCH}
mkdir -p "$(dirname "$ROOT")"
rm -rf "$ROOT"
install -d "$ROOT/DEBIAN" "$ROOT/usr/bin" "$ROOT/lib/systemd/system" "$ROOT/etc/syncfs" \
  "$ROOT/usr/share/man/man1" "$ROOT/usr/share/bash-completion/completions" \
  "$ROOT/usr/share/zsh/vendor-completions" "$ROOT/usr/share/fish/vendor_completions.d" \
  "$ROOT/usr/share/doc/syncfs"
for b in manager fs-node syncctl; do
  install -s -m 0755 "$BIN/$b" "$ROOT/usr/bin/$b"
  "$BIN/$b" --generate-cli man | gzip -9n > "$ROOT/usr/share/man/man1/$b.1.gz"
  "$BIN/$b" --generate-cli bash > "$ROOT/usr/share/bash-completion/completions/$b"
  "$BIN/$b" --generate-cli zsh > "$ROOT/usr/share/zsh/vendor-completions/_$b"
  "$BIN/$b" --generate-cli fish > "$ROOT/usr/share/fish/vendor_completions.d/$b.fish"
done
install -m 0644 packaging/syncfs-node.service packaging/syncfs-manager.service "$ROOT/lib/systemd/system/"
install -m 0644 packaging/node.toml packaging/manager.toml "$ROOT/etc/syncfs/"
install -m 0644 README.md docs/deploy.md docs/SEMANTICS.md "$ROOT/usr/share/doc/syncfs/"
printf '/etc/syncfs/node.toml\n/etc/syncfs/manager.toml\n' > "$ROOT/DEBIAN/conffiles"
cat > "$ROOT/DEBIAN/control" <<CONTROL
Package: syncfs
Version: $VERSION
Architecture: $ARCH
Maintainer: syncfs developers <syncfs@localhost>
Depends: fuse3, libc6, libgcc-s1
Recommends: rabbitmq-server
Section: utils
Priority: optional
Installed-Size: $(du -ks "$ROOT" | cut -f1)
Description: distributed file synchronisation over FUSE and RabbitMQ
 Each node mounts a FUSE file system whose changes go through a RabbitMQ broker to a
 manager, which orders them and tells every node; contents move between nodes over
 HTTP, verified by hash. Includes the manager, the node (fs-node), syncctl, systemd
 units (syncfs-manager, syncfs-node) and their settings files under /etc/syncfs.
CONTROL
cat > "$ROOT/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
POSTINST
chmod 0755 "$ROOT/DEBIAN/postinst"
cat > "$ROOT/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
  systemctl stop syncfs-node.service syncfs-manager.service 2>/dev/null || true
fi
PRERM
chmod 0755 "$ROOT/DEBIAN/prerm"
dpkg-deb --build --root-owner-group "$ROOT" >&2
log "built $ROOT.deb"
echo "$ROOT.deb"
