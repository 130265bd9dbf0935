#!/usr/bin/env bash
# Issue 13: recovery time (time to heartbeat) of instant recovery against
# restore-then-boot (vbackup, restic, borg), live restore against a plain
# restore, reads through the NBD export cold and warm. See bench/rto.py.
#
# Environment (optional): BENCH_RTO_SIZES ("4G 64G"), BENCH_RTO_DATA_MIB
# (1024), BENCH_RTO_ACCEL (tcg), VBACKUP (target/release/vbackup).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(./scripts/qemu-system.sh)"
[ -n "${VBACKUP:-}" ] || cargo build --release --locked -p vbackup-cli >&2
exec python3 bench/rto.py "$@"
