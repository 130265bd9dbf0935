#!/usr/bin/env bash
# Benchmark vbackup against restic and borg on one qcow2 VM image.
#
# Scenarios, run for each tool in the same order: full backup, re-backup of
# the unchanged image, backup after rewriting 1% of the allocated data,
# restore of the latest snapshot (checked against the source), repository
# size, and peak RSS of every backup and restore. Prints a markdown table
# and writes it to bench/results/latest.md. See bench/README.md.
#
# Environment (all optional):
#   BENCH_SIZE_GIB   virtual disk size in GiB, fractions allowed (default 4)
#   BENCH_FILL_PCT   file data written into the disk, % of its size (50)
#   BENCH_SRC        folder whose files fill the disk (/usr)
#   BENCH_CHANGE_PCT % of allocated units rewritten for scenario 3 (1)
#   BENCH_WRITE_KIB  size of one rewritten unit in KiB (4096)
#   BENCH_SEED       seed for file sampling and the change (1)
#   BENCH_TOOLS      tools to run (default "vbackup restic borg")
#   BENCH_KEEP=1     keep repositories and logs in bench/work/run-*
#   BENCH_NO_BUILD=1 do not run cargo build; VBACKUP_BIN names the binary
#   BENCH_PREPARE_ONLY=1  only build the cached images, run nothing
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")
WORK=$BENCH_DIR/work
SIZE_GIB=${BENCH_SIZE_GIB:-4}
FILL_PCT=${BENCH_FILL_PCT:-50}
SRC=${BENCH_SRC:-/usr}
CHANGE_PCT=${BENCH_CHANGE_PCT:-1}
WRITE_KIB=${BENCH_WRITE_KIB:-4096}
SEED=${BENCH_SEED:-1}
TOOLS=${BENCH_TOOLS:-vbackup restic borg}
VBACKUP_BIN=${VBACKUP_BIN:-$ROOT/target/release/vbackup}
VM=bench
FS_UUID=5ab1e5ed-0000-4000-8000-000000000001

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Installs the Debian packages whose commands are missing.
ensure_deps() {
    local missing=() cmd pkg
    for pair in restic:restic borg:borgbackup qemu-img:qemu-utils \
        qemu-io:qemu-utils mkfs.ext4:e2fsprogs python3:python3; do
        cmd=${pair%%:*} pkg=${pair#*:}
        command -v "$cmd" >/dev/null || missing+=("$pkg")
    done
    [[ -x /usr/bin/time ]] || missing+=(time)
    ((${#missing[@]} == 0)) && return
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Builds (or checks) the vbackup binary.
ensure_vbackup() {
    [[ " $TOOLS " == *" vbackup "* ]] || return 0
    if [[ ${BENCH_NO_BUILD:-0} != 1 ]]; then
        log "cargo build --release -p vbackup-cli"
        (cd "$ROOT" && cargo build --quiet --release -p vbackup-cli) \
            || die "vbackup does not build"
    fi
    [[ -x $VBACKUP_BIN ]] || die "no vbackup binary at $VBACKUP_BIN"
}

# Validates the settings and derives sizes and the image cache folder.
configure() {
    for tool in $TOOLS; do
        [[ $tool =~ ^(vbackup|restic|borg)$ ]] || die "unknown tool '$tool'"
    done
    SIZE_MIB=$(awk -v g="$SIZE_GIB" 'BEGIN { printf "%d", g * 1024 }')
    ((SIZE_MIB >= 64)) || die "BENCH_SIZE_GIB=$SIZE_GIB is below 64 MiB"
    local key="${SIZE_MIB}m-fill${FILL_PCT}-chg${CHANGE_PCT}x${WRITE_KIB}k"
    key+="-seed${SEED}$(tr '/' '_' <<<"$SRC")"
    IMG_DIR=$WORK/image-$key
}

# Creates base.qcow2 (ext4 filled from $SRC) and changed.qcow2 (base with
# $CHANGE_PCT% of its allocated units rewritten), unless already cached.
ensure_images() {
    if [[ -f $IMG_DIR/changed.qcow2 ]]; then
        log "using cached images in $IMG_DIR"
        return
    fi
    local tmp=$IMG_DIR.tmp budget
    rm -rf "$tmp"
    mkdir -p "$tmp"
    budget=$((SIZE_MIB * 1024 * 1024 * FILL_PCT / 100))
    log "sampling $((budget >> 20)) MiB of files from $SRC"
    python3 "$BENCH_DIR/make_tree.py" --seed "$SEED" "$SRC" "$tmp/tree" "$budget" \
        >"$tmp/tree.txt"
    log "mkfs.ext4 -d on a ${SIZE_MIB} MiB disk"
    truncate -s "${SIZE_MIB}M" "$tmp/disk.raw"
    E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -L vbench -U "$FS_UUID" \
        -E "hash_seed=$FS_UUID,root_owner=0:0" -d "$tmp/tree" "$tmp/disk.raw"
    rm -rf "$tmp/tree"
    qemu-img convert -f raw -O qcow2 "$tmp/disk.raw" "$tmp/base.qcow2"
    rm -f "$tmp/disk.raw"
    cp "$tmp/base.qcow2" "$tmp/changed.qcow2"
    log "rewriting ${CHANGE_PCT}% of the allocated ${WRITE_KIB} KiB units"
    python3 "$BENCH_DIR/mutate.py" --pct "$CHANGE_PCT" --write-kib "$WRITE_KIB" \
        --seed "$SEED" "$tmp/changed.qcow2" >"$tmp/change.txt"
    rm -rf "$IMG_DIR"
    mv "$tmp" "$IMG_DIR"
}

# Sets up the run folder, passphrases and caches of the peers.
prepare_run() {
    RUN=$WORK/run-$$
    mkdir -p "$RUN/data"
    DISK=$RUN/data/disk.qcow2
    RESULTS=$RUN/results.tsv
    : >"$RESULTS"
    unset VBACKUP_PASSWORD_FILE VBACKUP_REPOSITORY RESTIC_REPOSITORY \
        RESTIC_PASSWORD_FILE RESTIC_PASSWORD_COMMAND BORG_REPO BORG_PASSCOMMAND
    export VBACKUP_PASSWORD=bench RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench
    export RESTIC_CACHE_DIR=$RUN/cache/restic BORG_BASE_DIR=$RUN/borg-home
    export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
    trap cleanup EXIT
}

cleanup() {
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
        log "kept $RUN"
    else
        rm -rf "$RUN"
    fi
}

record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$RESULTS"; }
repo_of() { echo "$RUN/$1-repo"; }

# Copies the cached base image to the backed-up path (the tools, vbackup's
# dirty bitmaps and the change all act on this copy, never on the cache)
# and reads it once so every tool starts with a warm page cache.
use_base_image() {
    rm -f "$DISK"
    cp "$IMG_DIR/base.qcow2" "$DISK"
    cat "$DISK" >/dev/null
    sync
}

# Rewrites $CHANGE_PCT% of the allocated units of $DISK in place through
# qemu-io, as a running guest would: persistent dirty bitmaps in the image
# (vbackup's) record the writes; restic and borg see a modified file.
change_image() {
    python3 "$BENCH_DIR/mutate.py" --pct "$CHANGE_PCT" --write-kib "$WRITE_KIB" \
        --seed "$SEED" "$DISK" >"$RUN/change.txt"
    cat "$DISK" >/dev/null
    sync
}

# Runs "$@" under /usr/bin/time; records <scenario>_time and _rss for tool.
# The RSS is the larger of time's %M (the biggest single process) and the
# sampled sum over all processes of the command (helpers like qemu-nbd).
measure() {
    local tool=$1 scenario=$2 out secs kib tree_kib
    shift 2
    out=$RUN/$tool-$scenario
    log "$tool: $scenario: $*"
    if ! python3 "$BENCH_DIR/peak_rss.py" "$out.tree" \
        /usr/bin/time -f '%e %M' -o "$out.time" "$@" >"$out.log" 2>&1; then
        tail -n 20 "$out.log" >&2
        die "$tool failed in '$scenario': $*"
    fi
    read -r secs kib <"$out.time"
    read -r tree_kib <"$out.tree"
    ((tree_kib > kib)) && kib=$tree_kib
    record "$tool" "${scenario}_time" "$secs"
    record "$tool" "${scenario}_rss" "$(awk -v k="$kib" 'BEGIN { print k / 1024 }')"
    sync
}

init_repo() {
    local repo
    repo=$(repo_of "$1")
    case $1 in
    vbackup) "$VBACKUP_BIN" init --repo "$repo" ;;
    restic) restic -r "$repo" init ;;
    borg) borg init --encryption repokey-blake2 "$repo" ;;
    esac >"$RUN/$1-init.log" 2>&1 || die "$1 could not create its repository"
}

# Backs up $DISK with tool as the n-th snapshot.
backup() {
    local tool=$1 scenario=$2 n=$3 repo
    repo=$(repo_of "$tool")
    case $tool in
    vbackup) measure "$tool" "$scenario" "$VBACKUP_BIN" --json backup \
        --repo "$repo" --vm "$VM" "$DISK" ;;
    restic) measure "$tool" "$scenario" restic -r "$repo" backup \
        --compression auto "$DISK" ;;
    borg) measure "$tool" "$scenario" env -C "$RUN/data" borg create \
        --compression zstd,3 "$repo::snap-$n" disk.qcow2 ;;
    esac
    record "$tool" "bytes_$scenario" "$(du -sb "$repo" | cut -f1)"
}

# Restores the latest snapshot of tool and compares it with $DISK.
restore() {
    local tool=$1 n=$2 repo out status=OK
    repo=$(repo_of "$tool")
    out=$RUN/restore-$tool
    mkdir -p "$out"
    # Timed until the restored data is durable: vbackup fsyncs what it
    # restored, restic and borg do not, so each command is followed by sync.
    case $tool in
    vbackup) measure "$tool" restore sh -c '"$@" && sync' sh "$VBACKUP_BIN" --json restore \
        --repo "$repo" latest --vm "$VM" --target "$out" --format raw ;;
    restic) measure "$tool" restore sh -c '"$@" && sync' sh restic -r "$repo" restore latest \
        --target "$out" ;;
    borg) measure "$tool" restore sh -c 'cd "$1" && shift && "$@" && sync' sh "$out" \
        borg extract "$repo::snap-$n" ;;
    esac
    case $tool in
    vbackup) qemu-img compare -q -f qcow2 -F raw "$DISK" "$out/disk.raw" || status=FAIL ;;
    restic) cmp -s "$DISK" "$out$DISK" || status=FAIL ;;
    borg) cmp -s "$DISK" "$out/disk.qcow2" || status=FAIL ;;
    esac
    [[ $status == OK ]] || log "$tool: restored image differs from the source"
    record "$tool" restore_check "$status"
    rm -rf "$out"
}

# Streams the latest snapshot's disk to /dev/null: the restore pipeline
# (read, authenticate, decompress, check) without the target disk's speed.
stream() {
    local tool=$1 n=$2 repo
    repo=$(repo_of "$tool")
    case $tool in
    vbackup) measure "$tool" stream sh -c '"$@" >/dev/null' sh "$VBACKUP_BIN" restore \
        --repo "$repo" latest --vm "$VM" --disk disk --target - ;;
    restic) measure "$tool" stream sh -c '"$@" >/dev/null' sh restic -r "$repo" dump latest "$DISK" ;;
    borg) measure "$tool" stream sh -c '"$@" >/dev/null' sh borg extract --stdout \
        "$repo::snap-$n" disk.qcow2 ;;
    esac
}

# Derives the repository size rows (MiB) from the sizes after each backup.
derive_sizes() {
    local tool full unchanged changed
    for tool in $TOOLS; do
        full=$(value "$tool" bytes_full)
        unchanged=$(value "$tool" bytes_unchanged)
        changed=$(value "$tool" bytes_changed)
        record "$tool" repo_full "$(mib "$full")"
        record "$tool" repo_grow_unchanged "$(mib $((unchanged - full)))"
        record "$tool" repo_grow_changed "$(mib $((changed - unchanged)))"
        record "$tool" repo_final "$(mib "$changed")"
        record "$tool" changed_pct "$(awk -v c="$(value "$tool" changed_time)" \
            -v f="$(value "$tool" full_time)" 'BEGIN { print (f > 0 ? 100 * c / f : 0) }')"
    done
}

value() { awk -F'\t' -v t="$1" -v m="$2" '$1 == t && $2 == m { print $3 }' "$RESULTS"; }
mib() { awk -v b="$1" 'BEGIN { print b / 1048576 }'; }

# The lines above the table: machine, versions, image and settings.
write_header() {
    local cpu
    cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    {
        echo "## vbackup benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo
        echo "- Machine: $(nproc) cores, ${cpu:-unknown CPU}," \
            "$(awk '/MemTotal/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo)," \
            "Linux $(uname -r)"
        if [[ " $TOOLS " == *" vbackup "* ]]; then
            echo "- $("$VBACKUP_BIN" --version) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no commit'))"
        fi
        echo "- $(restic version | cut -d' ' -f1-2), $(borg --version)," \
            "$(qemu-img --version | head -n1 | cut -d' ' -f1-3)"
        echo "- Image: ${SIZE_MIB} MiB virtual qcow2" \
            "($(mib "$(stat -c %s "$IMG_DIR/base.qcow2")" | xargs printf '%.0f') MiB file)," \
            "ext4 holding $(cut -d' ' -f1 <"$IMG_DIR/tree.txt") files sampled from $SRC" \
            "($(mib "$(cut -d' ' -f3 <"$IMG_DIR/tree.txt")" | xargs printf '%.0f') MiB)"
        echo "- Change for scenario 3: $(cat "$RUN/change.txt"), random data (seed $SEED)," \
            "written in place through qemu-io (vbackup reads it through its dirty bitmap)"
        echo "- Settings: vbackup defaults (4 MiB chunks, zstd 3, AES-256-GCM);" \
            "restic --compression auto; borg repokey-blake2, --compression zstd,3"
        echo "- Page cache warm for every tool (image read once before each backup);" \
            "repos on the same disk as the image; sync between steps (not timed);" \
            "restores timed until durable (each tool's restore followed by sync)"
    } >"$RUN/header.md"
}

main() {
    ensure_deps
    configure
    if [[ ${BENCH_PREPARE_ONLY:-0} == 1 ]]; then
        ensure_images
        return
    fi
    ensure_vbackup
    ensure_images
    prepare_run
    local tool
    for tool in $TOOLS; do init_repo "$tool"; done
    use_base_image
    for tool in $TOOLS; do backup "$tool" full 1; done
    for tool in $TOOLS; do backup "$tool" unchanged 2; done
    change_image
    for tool in $TOOLS; do backup "$tool" changed 3; done
    for tool in $TOOLS; do restore "$tool" 3; done
    for tool in $TOOLS; do stream "$tool" 3; done
    derive_sizes
    write_header
    mkdir -p "$BENCH_DIR/results"
    python3 "$BENCH_DIR/table.py" "$RESULTS" "$RUN/header.md" \
        | tee "$BENCH_DIR/results/latest.md"
    if grep -q $'\trestore_check\tFAIL' "$RESULTS"; then
        die "a restored image differs from its source"
    fi
}

# Sourced by bench/remote.sh for its helpers: run only when executed.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
