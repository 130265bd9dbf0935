#!/usr/bin/env bash
# Makes a real QEMU (qemu-system-x86_64) available to the live-VM tests and
# prints the environment they read it from, for `eval "$(scripts/qemu-system.sh)"`.
#
# A qemu-system-x86_64 on PATH is used as it is. Otherwise Debian's
# packages are unpacked under target/qemu-system instead of installed:
# the distribution's qemu-system-x86 would pull in its own qemu-utils and
# replace the newer qemu-img/qemu-nbd the rest of the suite uses. Only the
# shared libraries it needs are installed with apt.
set -euo pipefail
cd "$(dirname "$0")/.."

emit() {
  echo "export VBACKUP_QEMU_SYSTEM='$1'"
  [ -n "${2:-}" ] && echo "export QEMU_MODULE_DIR='$2'"
  [ -n "${3:-}" ] && echo "export VBACKUP_QEMU_FIRMWARE='$3'"
  true
}

if command -v qemu-system-x86_64 >/dev/null; then
  emit "$(command -v qemu-system-x86_64)"
  exit 0
fi

dest=$PWD/target/qemu-system
bin=$dest/root/usr/bin/qemu-system-x86_64
if [ ! -x "$bin" ]; then
  mkdir -p "$dest/debs"
  (
    cd "$dest/debs"
    export DEBIAN_FRONTEND=noninteractive
    apt-get download qemu-system-x86 qemu-system-common qemu-system-data seabios >&2 ||
      { apt-get update -q >&2 && apt-get download qemu-system-x86 qemu-system-common qemu-system-data seabios >&2; }
  )
  for deb in "$dest"/debs/*.deb; do dpkg-deb -x "$deb" "$dest/root"; done
fi

# The libraries qemu-system-x86 depends on, minus QEMU's own packages.
libs=$(dpkg-deb -f "$dest"/debs/qemu-system-x86_*.deb Depends | tr ',' '\n' |
  sed -e 's/(.*)//' -e 's/|.*//' -e 's/ //g' | grep -v -e '^qemu' -e '^seabios' -e '^ipxe' -e '^$')
missing=()
for lib in $libs; do
  dpkg-query -W -f='${Status}' "$lib" 2>/dev/null | grep -q 'ok installed' || missing+=("$lib")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
    { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
fi

emit "$bin" "$(dirname "$(find "$dest/root" -name 'accel-tcg-x86_64.so' | head -n1)")" \
  "$dest/root/usr/share/seabios:$dest/root/usr/share/qemu"
