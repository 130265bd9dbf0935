#!/usr/bin/env bash
# Builds the small Linux guest the boot tests run under qemu-system-x86_64
# (see docs/test-guest.md) into target/guest, or into $1.
#
# Nothing is installed on the host: Debian's cloud kernel and
# busybox-static are downloaded with `apt-get download` and unpacked with
# `dpkg-deb -x`; the host's own qemu-ga (package qemu-guest-agent) is
# copied in with the shared libraries ldd names. The root file system is
# made by `mkfs.ext4 -d`, which needs no root privileges.
#
# Outputs: vmlinuz, initrd.img (cpio.gz: busybox and the virtio/ext4
# modules that are not built in), disk.raw (ext4, no partition table) and
# guest.env (the file names and the kernel command line). Cached: nothing
# is rebuilt while the outputs exist and the stamp holds this script's
# hash. Two builds at once are serialized by flock. Progress goes to
# stderr; stdout stays empty.
set -euo pipefail
script=$(readlink -f "$0")
cd "$(dirname "$script")/.."

out=$(mkdir -p "${1:-target/guest}" && cd "${1:-target/guest}" && pwd)
hash=$(sha256sum "$script" | cut -d' ' -f1)
outputs=(vmlinuz initrd.img disk.raw guest.env)
# The modules /dev/vda, its ext4 file system and the agent's virtio-serial
# port need; those built into the kernel are skipped, the rest are loaded
# with their dependencies.
wanted_modules=(virtio_pci virtio_blk virtio_console crc16 crc32c_generic mbcache jbd2 ext4)
append='console=ttyS0 root=/dev/vda rw panic=-1 quiet'

log() { echo "guest.sh: $*" >&2; }

up_to_date() {
  [ "$(cat "$out/stamp" 2>/dev/null)" = "$hash" ] || return 1
  for f in "${outputs[@]}"; do [ -s "$out/$f" ] || return 1; done
}

apt_download() {
  (
    cd "$out/debs"
    export DEBIAN_FRONTEND=noninteractive
    apt-get download "$@" >&2 2>/dev/null || { apt-get update -q >&2 && apt-get download "$@" >&2; }
  )
}

# A package's dependencies, one name a line, alternatives and versions dropped.
depends_of() {
  dpkg-deb -f "$1" Depends | tr ',' '\n' | sed -e 's/(.*)//' -e 's/|.*//' -e 's/ //g' | grep -v '^$'
}

download_debs() {
  mkdir -p "$out/debs"
  if ! ls "$out"/debs/linux-image-cloud-amd64_*.deb >/dev/null 2>&1 ||
    ! ls "$out"/debs/busybox-static_*.deb >/dev/null 2>&1; then
    log "downloading linux-image-cloud-amd64 and busybox-static"
    rm -f "$out"/debs/*.deb
    apt_download linux-image-cloud-amd64 busybox-static
  fi
  local meta kernel
  meta=$(ls "$out"/debs/linux-image-cloud-amd64_*.deb)
  kernel=$(depends_of "$meta" | grep '^linux-image-[0-9]' | head -n1)
  [ -n "$kernel" ] || { log "no versioned kernel in the Depends of $meta"; exit 1; }
  if ! ls "$out/debs/${kernel}"_*.deb >/dev/null 2>&1; then
    log "downloading $kernel"
    apt_download "$kernel"
  fi
  kernel_deb=$(ls "$out/debs/${kernel}"_*.deb)
  busybox_deb=$(ls "$out"/debs/busybox-static_*.deb)
}

unpack() {
  log "unpacking $(basename "$kernel_deb") and $(basename "$busybox_deb")"
  dpkg-deb -x "$kernel_deb" "$work/kernel"
  dpkg-deb -x "$busybox_deb" "$work/busybox"
  kver=$(ls "$work/kernel/lib/modules")
  moddir=$work/kernel/lib/modules/$kver
  busybox=$work/busybox/bin/busybox
}

# The .ko file of module $1 (dashes and underscores are the same), or nothing.
module_file() {
  [ -f "$work/modules.index" ] ||
    find "$moddir/kernel" -name '*.ko' | awk -F/ '{ n = $NF; sub(/\.ko$/, "", n); gsub(/-/, "_", n); print n, $0 }' >"$work/modules.index"
  awk -v n="${1//-/_}" '$1 == n { print $2; exit }' "$work/modules.index"
}

# Appends module $1 and, first, its dependencies to $load_order (once each).
add_module() {
  local name=${1//-/_} file dep
  case " $load_order " in *" $name "*) return ;; esac
  file=$(module_file "$name")
  if [ -z "$file" ]; then
    grep -q "/${name}.ko\$" "$moddir/modules.builtin" 2>/dev/null ||
      log "module $name is neither built in nor a module of $kver: skipped"
    return
  fi
  for dep in $(tr '\0' '\n' <"$file" | grep -a -m1 '^depends=' | cut -d= -f2 | tr ',' ' '); do
    add_module "$dep"
  done
  load_order="$load_order $name"
  cp "$file" "$work/initrd/lib/modules/$name.ko"
}

applet_links() {
  local root=$1 applet
  for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
  done
}

build_initrd() {
  local m
  mkdir -p "$work/initrd"/{bin,dev,proc,sys,newroot,lib/modules}
  cp "$busybox" "$work/initrd/bin/busybox"
  applet_links "$work/initrd"
  load_order=""
  for m in "${wanted_modules[@]}"; do add_module "$m"; done
  log "initrd modules (load order):$load_order"
  echo "$load_order" | tr ' ' '\n' | grep -v '^$' >"$work/initrd/modules"
  cat >"$work/initrd/init" <<'EOF'
#!/bin/busybox sh
# vbackup test guest, stage 1: load the modules the root disk needs,
# mount /dev/vda and hand over to its /sbin/init. Powers off (QEMU runs
# with -no-reboot, so it exits) if the root disk cannot be mounted.
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in $(cat /modules); do
  insmod "/lib/modules/$m.ko" || echo "vbackup-guest: cannot load module $m"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if ! mount -t ext4 -o rw /dev/vda /newroot || [ ! -x /newroot/sbin/init ]; then
  echo "vbackup-guest: cannot mount root /dev/vda"
  sync
  poweroff -f
  exit 1
fi
umount /proc /sys
mkdir -p /newroot/dev
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
echo "vbackup-guest: cannot start /sbin/init"
poweroff -f
EOF
  chmod 755 "$work/initrd/init"
  local cpio=(cpio)
  command -v cpio >/dev/null || cpio=("$busybox" cpio)
  (cd "$work/initrd" && find . | LC_ALL=C sort | "${cpio[@]}" -o -H newc 2>/dev/null) |
    gzip -9 >"$work/initrd.img"
}

# Copies the host's qemu-ga and every library ldd names (and the loader).
copy_agent() {
  local root=$1 ga lib
  ga=$(command -v qemu-ga || echo /usr/sbin/qemu-ga)
  [ -x "$ga" ] || { log "no qemu-ga on this host: install qemu-guest-agent"; exit 1; }
  mkdir -p "$root/usr/sbin"
  cp -L "$ga" "$root/usr/sbin/qemu-ga"
  for lib in $(ldd "$ga" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

build_root() {
  local root=$work/root
  mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,root,etc,var/run,var/lib,run}
  cp "$busybox" "$root/bin/busybox"
  applet_links "$root"
  copy_agent "$root"
  echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
  echo 'root:x:0:' >"$root/etc/group"
  echo vbackup-guest >"$root/etc/hostname"
  cat >"$root/sbin/init" <<'EOF'
#!/bin/sh
# vbackup test guest, stage 2: start the guest agent on its virtio-serial
# port, say "vbackup-guest: ready" on the console, and stay up.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mount -o remount,rw /
mkdir -p /var/run /run /tmp
hostname -F /etc/hostname
port=""
i=0
while [ -z "$port" ] && [ $i -lt 100 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
  done
  [ -n "$port" ] && [ -c "$port" ] || { port=""; sleep 0.1; i=$((i + 1)); }
done
if [ -n "$port" ]; then
  qemu-ga -m virtio-serial -p "$port" -f /var/run/qemu-ga.pid -t /var/run &
else
  echo "vbackup-guest: no virtio-serial port org.qemu.guest_agent.0, no agent"
fi
echo "vbackup-guest: ready"
while :; do sleep 3600; done
EOF
  # qemu-ga's guest-shutdown runs /sbin/shutdown -h -P +0 "...".
  cat >"$root/sbin/shutdown" <<'EOF'
#!/bin/sh
# What qemu-ga's guest-shutdown runs: -r reboots, anything else powers off.
sync
case " $* " in
  *" -r "*) reboot -f ;;
  *) poweroff -f ;;
esac
EOF
  chmod 755 "$root/sbin/init" "$root/sbin/shutdown"
  log "making the ext4 root file system"
  rm -f "$work/disk.raw"
  mkfs.ext4 -q -F -L vbackup-guest -E root_owner=0:0 -d "$root" "$work/disk.raw" 64M >&2
}

write_env() {
  cat >"$work/guest.env" <<EOF
# The vbackup test guest (scripts/guest.sh); file names are relative to this folder.
KERNEL=vmlinuz
INITRD=initrd.img
DISK=disk.raw
DISK_FORMAT=raw
APPEND='$append'
EOF
}

exec 9>"$out/lock"
flock 9
if up_to_date; then
  exit 0
fi
log "building the test guest in $out"
rm -f "$out/stamp"
work=$out/work
rm -rf "$work"
mkdir -p "$work"
download_debs
unpack
cp "$work/kernel/boot/vmlinuz-$kver" "$work/vmlinuz"
build_initrd
build_root
write_env
for f in "${outputs[@]}"; do mv -f "$work/$f" "$out/$f"; done
rm -rf "$work"
echo "$hash" >"$out/stamp"
log "done: $out ($kver)"
