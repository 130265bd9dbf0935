#!/usr/bin/env bash
# The whole test suite: unit, property and integration tests (the latter
# start real qemu-img / qemu-nbd processes). Installs missing tools first.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-nbd >/dev/null || ! command -v mkfs.ext4 >/dev/null || ! command -v qemu-io >/dev/null ||
  ! command -v debugfs >/dev/null || ! command -v qemu-ga >/dev/null || ! command -v cpio >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q && apt-get install -y -q qemu-utils e2fsprogs qemu-guest-agent cpio
fi
# The S3 tests start real Garage servers on loopback.
export PATH="$HOME/.cargo/bin:$PATH"
command -v garage >/dev/null || cargo install garage --locked --version 2.5.0  # the version the tests were written against
# A real QEMU for the live-VM tests (unpacked, not installed; see the script).
eval "$(./scripts/qemu-system.sh)"
# The small Linux guest the boot tests run (cached in target/guest; see
# docs/test-guest.md), built now so the tests find it warm.
./scripts/guest.sh
# vbackup as a library alone (no CLI crate): back up an image and restore it.
example_dir=$(mktemp -d)
trap 'rm -rf "$example_dir"' EXIT
cargo run -q --locked -p vbackup-vm --example library_backup_restore -- "$example_dir/work"
if command -v cargo-nextest >/dev/null; then
  cargo nextest run --workspace --locked --no-fail-fast
  cargo test --workspace --locked --doc
else
  cargo test --workspace --locked --no-fail-fast
fi
