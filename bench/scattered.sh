#!/usr/bin/env bash
# Scattered small writes (issue 12): the benchmark image of run.sh backed
# up in full, then BENCH_CHANGE_PCT% of the virtual disk rewritten in
# random writes of each size in BENCH_SCATTER_KIB (through qemu-io, on
# allocated blocks, several seeds), then the incremental backup through
# the image's dirty bitmap. Prints bytes read, bytes stored and time of
# the incremental as ratios to the changed bytes and to the full backup,
# checks that the incremental restores to the changed image, and writes
# the table to bench/results/scattered-latest.md. See bench/README.md.
#
# Environment (besides run.sh's BENCH_SIZE_GIB, BENCH_FILL_PCT, BENCH_SRC,
# BENCH_KEEP, BENCH_NO_BUILD, VBACKUP_BIN):
#   BENCH_SCATTER_KIB    write sizes in KiB (default "4 16 64")
#   BENCH_SCATTER_SEEDS  seeds, one run per size and seed (default "1 2 3")
#   BENCH_CHANGE_PCT     % of the virtual disk rewritten (default 1)
#   BENCH_RESTORE_CHECK  0 skips the restore and compare (default 1)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# run.sh's helpers and settings; its image cache is the one made with
# BENCH_WRITE_KIB=64 (only base.qcow2 is used here).
BENCH_WRITE_KIB=${BENCH_WRITE_KIB:-64}
source "$BENCH_DIR/run.sh"
SIZES=${BENCH_SCATTER_KIB:-4 16 64}
SEEDS=${BENCH_SCATTER_SEEDS:-1 2 3}
RESTORE_CHECK=${BENCH_RESTORE_CHECK:-1}

stat_of() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["stats"][sys.argv[2]])' "$1" "$2"; }

# One size and seed: new repository, full backup, change, incremental.
one_run() {
    local kib=$1 seed=$2 repo=$RUN/repo-$1-$2 out=$RUN/$1-$2 changed
    rm -f "$DISK"
    cp "$IMG_DIR/base.qcow2" "$DISK"
    cat "$DISK" >/dev/null
    "$VBACKUP_BIN" init --repo "$repo" >"$out-init.log" 2>&1 || die "init failed"
    sync
    log "$kib KiB seed $seed: full backup"
    /usr/bin/time -f '%e' -o "$out-full.time" "$VBACKUP_BIN" --json backup \
        --repo "$repo" --vm "$VM" "$DISK" >"$out-full.json" 2>"$out-full.log" \
        || die "full backup failed: $(tail -n 5 "$out-full.log")"
    local full_bytes
    full_bytes=$(du -sb "$repo" | cut -f1)
    python3 "$BENCH_DIR/mutate.py" --of-disk --pct "$CHANGE_PCT" --write-kib "$kib" \
        --seed "$seed" "$DISK" >"$out-change.txt"
    changed=$(sed -E 's/.*\(([0-9]+) bytes\).*/\1/' "$out-change.txt")
    cat "$DISK" >/dev/null
    sync
    log "$kib KiB seed $seed: $(cat "$out-change.txt"); incremental"
    /usr/bin/time -f '%e' -o "$out-inc.time" "$VBACKUP_BIN" --json backup \
        --repo "$repo" --vm "$VM" "$DISK" >"$out-inc.json" 2>"$out-inc.log" \
        || die "incremental failed: $(tail -n 5 "$out-inc.log")"
    local grown=$(($(du -sb "$repo" | cut -f1) - full_bytes)) status=-
    if [[ $RESTORE_CHECK == 1 ]]; then
        "$VBACKUP_BIN" restore --repo "$repo" latest --vm "$VM" --target "$RUN/restore" \
            --format raw >"$out-restore.log" 2>&1 || die "restore failed"
        status=OK
        qemu-img compare -q -f qcow2 -F raw "$DISK" "$RUN/restore/disk.raw" || status=FAIL
        rm -rf "$RUN/restore"
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$kib" "$seed" "$changed" \
        "$(stat_of "$out-full.json" bytes-read)" "$(cat "$out-full.time")" \
        "$(stat_of "$out-inc.json" bytes-read)" "$(stat_of "$out-inc.json" bytes-stored)" \
        "$(cat "$out-inc.time")" "$grown" "$status" "$full_bytes" >>"$RESULTS"
    rm -rf "$repo"
}

table() {
    python3 - "$RESULTS" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
mib = lambda b: f"{int(b) / 1048576:.1f}"
print("| writes | seed | changed MiB | inc. read MiB | read / changed | inc. stored MiB | stored / changed | repo growth MiB | full s | inc. s | inc. / full | restore |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for kib, seed, changed, full_read, full_s, read, stored, inc_s, grown, status, _ in rows:
    c = int(changed)
    print(f"| {kib} KiB | {seed} | {mib(c)} | {mib(read)} | {int(read) / c:.2f}x | {mib(stored)} "
          f"| {int(stored) / c:.2f}x | {mib(grown)} | {float(full_s):.2f} | {float(inc_s):.2f} "
          f"| {100 * float(inc_s) / float(full_s):.1f}% | {status} |")
PY
}

main() {
    TOOLS=vbackup
    configure
    ensure_vbackup
    ensure_images
    prepare_run
    local kib seed
    for kib in $SIZES; do
        for seed in $SEEDS; do one_run "$kib" "$seed"; done
    done
    mkdir -p "$BENCH_DIR/results"
    {
        echo "## Scattered small writes, $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo
        echo "- $("$VBACKUP_BIN" --version) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no commit')), $(nproc) cores"
        echo "- Image: ${SIZE_MIB} MiB virtual qcow2, ext4 with files from $SRC ($(cut -d' ' -f1 <"$IMG_DIR/tree.txt") files);" \
            "change: ${CHANGE_PCT}% of the virtual disk in random writes on allocated blocks (bench/mutate.py --of-disk), random data"
        echo
        table
    } | tee "$BENCH_DIR/results/scattered-latest.md"
    if grep -q $'\tFAIL\t' "$RESULTS"; then
        die "a restored image differs from its source"
    fi
}

main "$@"
