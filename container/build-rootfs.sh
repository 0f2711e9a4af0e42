#!/usr/bin/env bash
# Assembles the node image's root file system from the fs-node and syncctl binaries
# (release or test build) and the shared libraries they need (found with ldd, the dynamic loader too).
#
#   container/build-rootfs.sh [--bin-dir DIR] [--out DIR]
#
# --bin-dir: where fs-node and syncctl are (default: $CARGO_TARGET_DIR/release or target/release)
# --out:     the root file system to (re)create (default: container/rootfs)
# Then `manager image build --rootfs DIR` packs it with container/Dockerfile.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
bin_dir=${CARGO_TARGET_DIR:-$repo/target}/release
out=$here/rootfs
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "build-rootfs: unknown argument $1" >&2; exit 2 ;;
  esac
done

bins=(fs-node syncctl)
for b in "${bins[@]}"; do
  [ -x "$bin_dir/$b" ] || { echo "build-rootfs: $bin_dir/$b not found; run: cargo build --release -p fs-node" >&2; exit 1; }
done

# Never delete anything but a directory this script made (it leaves a marker file).
if [ -e "$out" ]; then
  [ -e "$out/.syncfs-rootfs" ] || { echo "build-rootfs: $out exists and was not made by this script; refusing to replace it" >&2; exit 1; }
  rm -rf "$out"
fi
mkdir -p "$out"/{usr/local/bin,etc,tmp,mnt/sync,var/lib/syncfs}
touch "$out/.syncfs-rootfs"
chmod 1777 "$out/tmp"

copy_with_parents() { # copies a file, dereferenced, to the same absolute path under $out
  local src=$1
  mkdir -p "$out$(dirname "$src")"
  cp -L "$src" "$out$src"
}

for b in "${bins[@]}"; do
  cp -L "$bin_dir/$b" "$out/usr/local/bin/$b"
  # A test (debug) build carries line tables; the image needs none (symbols stay).
  strip --strip-debug "$out/usr/local/bin/$b"
  # ldd lines: "libx.so => /path/libx.so (0x..)" or "/lib64/ld-linux-x86-64.so.2 (0x..)".
  if ! deps=$(ldd "$bin_dir/$b" 2>&1); then
    case "$deps" in
      *"not a dynamic executable"*|*"statically linked"*) continue ;;
      *) echo "build-rootfs: ldd $b failed: $deps" >&2; exit 1 ;;
    esac
  fi
  if grep -q "not found" <<<"$deps"; then
    echo "build-rootfs: $b needs libraries that are missing here:" >&2; grep "not found" <<<"$deps" >&2; exit 1
  fi
  while read -r lib; do
    [ -n "$lib" ] && copy_with_parents "$lib"
  done < <(awk '/=> \// {print $3} /^[[:space:]]*\// {print $1}' <<<"$deps")
done

cat >"$out/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/usr/local/bin/fs-node
nobody:x:65534:65534:nobody:/nonexistent:/usr/local/bin/fs-node
PASSWD
cat >"$out/etc/group" <<'GROUP'
root:x:0:
nogroup:x:65534:
GROUP
printf 'hosts: files dns\n' >"$out/etc/nsswitch.conf"

echo "build-rootfs: $out ($(du -sh "$out" | cut -f1)): ${bins[*]} and $(find "$out" -name '*.so*' | wc -l) libraries" >&2
