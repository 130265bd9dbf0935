#!/usr/bin/env bash
# Issue 12 benchmarks: sparse disks and what restores allocate.
#
# 1. Sparse: for each size in BENCH_SPARSE_SIZES, a qcow2 of that virtual
#    size holding BENCH_SPARSE_PLACES regions of BENCH_SPARSE_KIB KiB of
#    random data (bench/sparse_image.py). vbackup backs it up and restores
#    it as raw and as qcow2, each timed (restores until durable) and
#    compared with the source (qemu-img compare), with the allocated size
#    of each restored image beside the source's. restic, borg and rustic
#    back up and restore the image file where installed (they are not
#    installed by this script). `qemu-img convert` to a sparse raw file
#    is the floor.
# 2. Restore allocation: the 4 GiB image of bench/run.sh (built and cached
#    by its ensure_images, same settings variables) is backed up and
#    restored as qcow2 and as raw; the allocated sizes (`du`, qemu-img's
#    actual-size) are compared with the source's.
#
# Prints a markdown report and writes it to bench/results/sparse-latest.md.
#
# Environment (all optional, besides those of bench/run.sh):
#   BENCH_SPARSE_SIZES   virtual sizes, qemu-img syntax (default "1T 16T")
#   BENCH_SPARSE_PLACES  regions of data (64)
#   BENCH_SPARSE_KIB     KiB per region (1024)
#   BENCH_SKIP_ALLOC=1   skip scenario 2 (it builds a 4 GiB image once)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/run.sh
source "$BENCH_DIR/run.sh"

SPARSE_SIZES=${BENCH_SPARSE_SIZES:-1T 16T}
PLACES=${BENCH_SPARSE_PLACES:-64}
KIB=${BENCH_SPARSE_KIB:-1024}
PEERS=$(for t in restic borg rustic; do if command -v "$t" >/dev/null; then echo "$t"; fi; done | xargs)
REPORT=()

allocated() { du -B1 "$1" | cut -f1; }
actual_size() {
    qemu-img info --output=json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["actual-size"])'
}
secs() { cut -d' ' -f1 <"$RUN/$1.time"; }
rss() { value "$1" "${2}_rss" | xargs printf '%.0f'; }
row() {
    local line="|" cell
    for cell in "$@"; do line+=" $cell |"; done
    REPORT+=("$line")
}

# The cached sparse image of one size.
sparse_image() {
    local size=$1 dir=$WORK/sparse-$1-${PLACES}x${KIB}k-seed$SEED
    if [[ ! -f $dir/image.qcow2 ]]; then
        log "creating a $size qcow2 with $PLACES x $KIB KiB of data"
        rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
        python3 "$BENCH_DIR/sparse_image.py" --size "$size" --places "$PLACES" \
            --kib "$KIB" --seed "$SEED" "$dir.tmp/image.qcow2" >"$dir.tmp/what.txt"
        rm -rf "$dir" && mv "$dir.tmp" "$dir"
    fi
    echo "$dir/image.qcow2"
}

# Restores the latest snapshot of $vm in $format into $out (timed as
# restore-<tag>), compares it with $image and records allocations.
vbackup_restore() {
    local repo=$1 vm=$2 image=$3 format=$4 tag=$5 out=$RUN/out-$5 file
    rm -rf "$out" && mkdir -p "$out"
    measure vbackup "restore-$tag" sh -c '"$@" && sync' sh "$VBACKUP_BIN" restore \
        --repo "$repo" latest --vm "$vm" --target "$out" --format "$format"
    file=$(ls "$out"/*."$format")
    qemu-img compare -q -F "$format" "$image" "$file" || die "$tag: restored image differs"
    case $format in
    raw) record vbackup "alloc-$tag" "$(allocated "$file")" ;;
    *) record vbackup "alloc-$tag" "$(actual_size "$file")" ;;
    esac
    rm -rf "$out"
}

# Whether this file system can hold a raw file of $1 bytes (ext4 stops
# just below 16 TiB).
raw_fits() { truncate -s "$1" "$RUN/fits" 2>/dev/null && rm -f "$RUN/fits"; }

sparse_scenario() {
    local size=$1 image vm=sparse-$1 repo=$RUN/vbackup-$1 bytes src
    image=$(sparse_image "$size")
    bytes=$(qemu-img info --output=json "$image" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
    src=$(actual_size "$image")
    cat "$image" >/dev/null
    local floor_raw="n/a"
    if raw_fits "$bytes"; then
        measure floor "convert-$size-raw" qemu-img convert -O raw "$image" "$RUN/convert.raw"
        floor_raw=$(secs "floor-convert-$size-raw")
    fi
    measure floor "convert-$size-qcow2" qemu-img convert -O qcow2 "$image" "$RUN/convert.qcow2"
    rm -f "$RUN/convert.raw" "$RUN/convert.qcow2"
    "$VBACKUP_BIN" init --repo "$repo" >"$RUN/init-$size.log" 2>&1
    measure vbackup "backup-$size" "$VBACKUP_BIN" backup --repo "$repo" --vm "$vm" "$image"
    vbackup_restore "$repo" "$vm" "$image" qcow2 "$size-qcow2"
    local raw="n/a (file system limit)" raw_alloc="n/a"
    if raw_fits "$bytes"; then
        vbackup_restore "$repo" "$vm" "$image" raw "$size-raw"
        raw=$(secs "vbackup-restore-$size-raw")
        raw_alloc=$(mib "$(value vbackup "alloc-$size-raw")" | xargs printf '%.1f')
    fi
    row "$size virtual, $(mib "$src" | xargs printf '%.1f') MiB allocated" \
        "$(secs "vbackup-backup-$size") s ($(rss vbackup "backup-$size") MiB)" \
        "$raw s / $raw_alloc MiB" \
        "$(secs "vbackup-restore-$size-qcow2") s / $(mib "$(value vbackup "alloc-$size-qcow2")" | xargs printf '%.1f') MiB" \
        "$floor_raw s / $(secs "floor-convert-$size-qcow2") s"
    for peer in $PEERS; do peer_scenario "$peer" "$size" "$image"; done
}

# restic, borg or rustic on the image file itself.
peer_scenario() {
    local tool=$1 size=$2 image=$3 repo=$RUN/$1-$2 out=$RUN/out-$1
    mkdir -p "$out"
    case $tool in
    restic | rustic)
        "$tool" -r "$repo" init >"$RUN/$tool-init.log" 2>&1
        measure "$tool" "backup-$size" "$tool" -r "$repo" backup "$image"
        measure "$tool" "restore-$size" sh -c '"$@" && sync' sh "$tool" -r "$repo" \
            restore latest --target "$out" ;;
    borg)
        borg init --encryption repokey-blake2 "$repo" >"$RUN/borg-init.log" 2>&1
        measure borg "backup-$size" env -C "$(dirname "$image")" borg create \
            --compression zstd,3 "$repo::s" "$(basename "$image")"
        measure borg "restore-$size" sh -c 'cd "$1" && shift && "$@" && sync' sh "$out" \
            borg extract "$repo::s" ;;
    esac
    REPORT+=("| $tool on the image file, $size | $(secs "$tool-backup-$size") s | $(secs "$tool-restore-$size") s (the qcow2 file) | | |")
    rm -rf "$out" "$repo"
}

alloc_scenario() {
    configure
    ensure_images
    local image=$IMG_DIR/base.qcow2 repo=$RUN/vbackup-alloc src
    src=$(actual_size "$image")
    cat "$image" >/dev/null
    "$VBACKUP_BIN" init --repo "$repo" >"$RUN/init-alloc.log" 2>&1
    measure vbackup backup-alloc "$VBACKUP_BIN" backup --repo "$repo" --vm alloc "$image"
    vbackup_restore "$repo" alloc "$image" qcow2 alloc-qcow2
    vbackup_restore "$repo" alloc "$image" raw alloc-raw
    local q r
    q=$(value vbackup alloc-alloc-qcow2) r=$(value vbackup alloc-alloc-raw)
    ALLOC_ROWS=(
        "| source qcow2 (${SIZE_MIB} MiB virtual) | $(mib "$src" | xargs printf '%.1f') MiB | 1.000 | |"
        "| restored qcow2 | $(mib "$q" | xargs printf '%.1f') MiB | $(awk -v a="$q" -v b="$src" 'BEGIN { printf "%.3f", a / b }') | $(secs vbackup-restore-alloc-qcow2) s |"
        "| restored raw | $(mib "$r" | xargs printf '%.1f') MiB | $(awk -v a="$r" -v b="$src" 'BEGIN { printf "%.3f", a / b }') | $(secs vbackup-restore-alloc-raw) s |"
    )
}

main_sparse() {
    configure
    ensure_vbackup
    RUN=$WORK/run-$$
    mkdir -p "$RUN"
    RESULTS=$RUN/results.tsv
    : >"$RESULTS"
    export VBACKUP_PASSWORD=bench RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench
    export RESTIC_CACHE_DIR=$RUN/cache/restic BORG_BASE_DIR=$RUN/borg-home
    trap cleanup EXIT
    for size in $SPARSE_SIZES; do sparse_scenario "$size"; done
    ALLOC_ROWS=()
    [[ ${BENCH_SKIP_ALLOC:-0} == 1 ]] || alloc_scenario
    mkdir -p "$BENCH_DIR/results"
    {
        echo "## Sparse disks and restore allocation, $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo
        echo "- $("$VBACKUP_BIN" --version) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no commit')), $(qemu-img --version | head -n1 | cut -d' ' -f1-3), $(nproc) cores"
        echo "- Sparse images: $PLACES regions of $KIB KiB of random data each (bench/sparse_image.py, seed $SEED)"
        echo "- Peers installed: ${PEERS:-none}"
        echo
        echo "| Image | vbackup backup (peak RSS) | restore raw / allocated | restore qcow2 / allocated | qemu-img convert to raw / qcow2 |"
        echo "|---|---:|---:|---:|---:|"
        printf '%s\n' "${REPORT[@]}"
        if ((${#ALLOC_ROWS[@]})); then
            echo
            echo "| Restore allocation | allocated | / source | restore time |"
            echo "|---|---:|---:|---:|"
            printf '%s\n' "${ALLOC_ROWS[@]}"
        fi
    } | tee "$BENCH_DIR/results/sparse-latest.md"
}

main_sparse "$@"
