#!/usr/bin/env bash
# Benchmark vbackup's storage targets on one qcow2 VM image: full backup,
# incremental backup after rewriting 1% of the data (bench/mutate.py), and
# restore (checked against the source), with
#   local          vbackup to a repository on the local disk
#   garage         vbackup to Garage (S3) on loopback (chunks in 16 MiB packs,
#                  the default on S3)
#   garage-loose   the same with one object per 4 MiB chunk
#                  (`init --pack-size 0`, the layout before packs)
#   garage-16m     one object per 16 MiB chunk (`init --chunk-size 16M
#                  --pack-size 0`): a quarter of the requests, coarser dedup
#   restic-garage  restic to the same Garage, for comparison
#   server         vbackup to its own backup server (`vbackup server`) on
#                  loopback over HTTPS: init with an admin token, backups
#                  with an append-only backup token, restore with a read token
# For the S3 targets it counts the requests the server received (Garage's
# api_s3_request_counter from its admin API /metrics) and prints them per
# GiB of image data. Prints a markdown table and writes it to
# bench/results/remote-latest.md.
#
# Each target backs up its own copy of the image (vbackup's dirty bitmaps
# belong to one repository), changed with the same seed. A new target is a
# case in target_init / target_backup / target_restore and a name in
# BENCH_TARGETS.
#
# Environment: as bench/run.sh (BENCH_SIZE_GIB, BENCH_FILL_PCT, BENCH_SRC,
# BENCH_CHANGE_PCT, BENCH_WRITE_KIB, BENCH_SEED, BENCH_KEEP, BENCH_NO_BUILD,
# VBACKUP_BIN), plus
#   BENCH_TARGETS   targets to run (default "local garage garage-loose server restic-garage")
#   GARAGE_BIN      the garage binary (default: on PATH or ~/.cargo/bin)
set -euo pipefail

# shellcheck source=bench/run.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/run.sh"

TARGETS=${BENCH_TARGETS:-local garage garage-loose server restic-garage}
TOOLS="vbackup restic"
GARAGE_BIN=${GARAGE_BIN:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}
BUCKET=vbench

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
garage_cli() { "$GARAGE_BIN" -c "$GARAGE_DIR/garage.toml" "$@"; }

# Starts a one-node Garage on loopback with a bucket and a key for it.
start_garage() {
    [[ -x $GARAGE_BIN ]] || die "no garage binary: run cargo install garage --locked"
    GARAGE_DIR=$RUN/garage
    mkdir -p "$GARAGE_DIR"
    local rpc s3 admin id i
    rpc=$(free_port) s3=$(free_port) admin=$(free_port)
    cat >"$GARAGE_DIR/garage.toml" <<TOML
metadata_dir = "$GARAGE_DIR/meta"
data_dir = "$GARAGE_DIR/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
api_bind_addr = "127.0.0.1:$s3"
s3_region = "garage"
[admin]
api_bind_addr = "127.0.0.1:$admin"
TOML
    "$GARAGE_BIN" -c "$GARAGE_DIR/garage.toml" server >"$GARAGE_DIR/server.log" 2>&1 &
    GARAGE_PID=$!
    for i in $(seq 100); do
        id=$(garage_cli node id -q 2>/dev/null) && break
        sleep 0.2
    done
    [[ -n ${id:-} ]] || die "garage did not start (see $GARAGE_DIR/server.log)"
    garage_cli layout assign -z dc1 -c 10G "${id%%@*}" >/dev/null
    garage_cli layout apply --version 1 >/dev/null
    AWS_ACCESS_KEY_ID=GK$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
    AWS_SECRET_ACCESS_KEY=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION=garage AWS_DEFAULT_REGION=garage
    garage_cli key import --yes -n bench "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >/dev/null
    garage_cli bucket create "$BUCKET" >/dev/null
    garage_cli bucket allow --read --write --owner "$BUCKET" --key "$AWS_ACCESS_KEY_ID" >/dev/null
    S3_URL=http://127.0.0.1:$s3
    METRICS_URL=http://127.0.0.1:$admin/metrics
    log "garage $("$GARAGE_BIN" --version | cut -d' ' -f2) on $S3_URL (pid $GARAGE_PID)"
}

stop_garage() {
    if [[ -n ${GARAGE_PID:-} ]]; then
        kill "$GARAGE_PID" 2>/dev/null || true
        wait "$GARAGE_PID" 2>/dev/null || true
        GARAGE_PID=
    fi
}

# Starts `vbackup server` on loopback with a fresh data folder and makes an
# admin, a backup and a read token for the repository "bench".
start_server() {
    SERVER_DIR=$RUN/server
    local port i
    port=$(free_port)
    for role in admin backup read; do
        "$VBACKUP_BIN" server token add --data "$SERVER_DIR" --repo bench --role "$role" \
            2>/dev/null >"$RUN/token-$role"
    done
    "$VBACKUP_BIN" server --listen "127.0.0.1:$port" --data "$SERVER_DIR" \
        >"$RUN/server.log" 2>&1 &
    SERVER_PID=$!
    for i in $(seq 100); do
        grep -q 'listening on' "$RUN/server.log" && break
        sleep 0.1
    done
    grep -q 'listening on' "$RUN/server.log" || die "vbackup server did not start (see $RUN/server.log)"
    VBACKUP_SERVER_FINGERPRINT=$(grep -o 'fingerprint [0-9a-f:]*' "$RUN/server.log" | head -n1 | cut -d' ' -f2)
    export VBACKUP_SERVER_FINGERPRINT
    SERVER_URL=https://127.0.0.1:$port/bench
    log "vbackup server on $SERVER_URL (pid $SERVER_PID)"
}

stop_server() {
    if [[ -n ${SERVER_PID:-} ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
}

# vbackup with the token of a role for the server target.
with_token() {
    local role=$1
    shift
    env VBACKUP_TOKEN="$(cat "$RUN/token-$role")" "$@"
}

# All S3 requests Garage has served so far.
s3_requests() {
    curl -sf "$METRICS_URL" | awk '/^api_s3_request_counter\{/ { n += $2 } END { printf "%d", n }'
}

# Repository of a target.
target_repo() {
    case $1 in
    local) echo "$RUN/local-repo" ;;
    garage) echo "s3:$S3_URL/$BUCKET/vbackup" ;;
    garage-16m) echo "s3:$S3_URL/$BUCKET/vbackup16m" ;;
    garage-loose) echo "s3:$S3_URL/$BUCKET/vbackuploose" ;;
    restic-garage) echo "s3:$S3_URL/$BUCKET/restic" ;;
    server) echo "$SERVER_URL" ;;
    *) die "unknown target '$1'" ;;
    esac
}

is_s3() { [[ $1 == garage || $1 == garage-16m || $1 == garage-loose || $1 == restic-garage ]]; }

target_init() {
    local repo
    repo=$(target_repo "$1")
    case $1 in
    local | garage) "$VBACKUP_BIN" init --repo "$repo" ;;
    garage-16m) "$VBACKUP_BIN" init --repo "$repo" --chunk-size 16M --pack-size 0 ;;
    garage-loose) "$VBACKUP_BIN" init --repo "$repo" --pack-size 0 ;;
    server) with_token admin "$VBACKUP_BIN" init --repo "$repo" ;;
    restic-garage) restic -r "$repo" init ;;
    esac >"$RUN/$1-init.log" 2>&1 || die "$1: could not create the repository"
}

# Runs one timed step of a target, counting the S3 requests it made.
step() {
    local target=$1 scenario=$2 before=0
    shift 2
    is_s3 "$target" && before=$(s3_requests)
    measure "$target" "$scenario" "$@"
    is_s3 "$target" && record "$target" "${scenario}_requests" $(($(s3_requests) - before))
    return 0
}

target_backup() {
    local target=$1 scenario=$2 repo
    repo=$(target_repo "$target")
    case $target in
    local | garage | garage-16m | garage-loose) step "$target" "$scenario" "$VBACKUP_BIN" --json backup \
        --repo "$repo" --vm "$VM" "$DISK" ;;
    server) step "$target" "$scenario" env VBACKUP_TOKEN="$(cat "$RUN/token-backup")" \
        "$VBACKUP_BIN" --json backup --repo "$repo" --vm "$VM" "$DISK" ;;
    restic-garage) step "$target" "$scenario" restic -r "$repo" backup \
        --compression auto "$DISK" ;;
    esac
}

target_restore() {
    local target=$1 repo out status=OK
    repo=$(target_repo "$target")
    out=$RUN/restore-$target
    mkdir -p "$out"
    case $target in
    local | garage | garage-16m | garage-loose) step "$target" restore sh -c '"$@" && sync' sh "$VBACKUP_BIN" --json \
        restore --repo "$repo" latest --vm "$VM" --target "$out" --format raw ;;
    server) step "$target" restore sh -c '"$@" && sync' sh env \
        VBACKUP_TOKEN="$(cat "$RUN/token-read")" "$VBACKUP_BIN" --json \
        restore --repo "$repo" latest --vm "$VM" --target "$out" --format raw ;;
    restic-garage) step "$target" restore sh -c '"$@" && sync' sh restic -r "$repo" \
        restore latest --target "$out" ;;
    esac
    case $target in
    local | garage | garage-16m | garage-loose | server) qemu-img compare -q -f qcow2 -F raw "$DISK" "$out/disk.raw" || status=FAIL ;;
    restic-garage) cmp -s "$DISK" "$out$DISK" || status=FAIL ;;
    esac
    [[ $status == OK ]] || log "$target: restored image differs from the source"
    record "$target" restore_check "$status"
    rm -rf "$out"
}

run_target() {
    local target=$1
    DISK=$RUN/data/$target/disk.qcow2
    mkdir -p "$(dirname "$DISK")"
    target_init "$target"
    use_base_image
    target_backup "$target" full
    change_image
    target_backup "$target" changed
    target_restore "$target"
    rm -f "$DISK"
}

# Requests per GiB of image data (the allocated data of the qcow2).
derive_per_gib() {
    local target gib scenario n
    gib=$(awk -v b="$(stat -c %s "$IMG_DIR/base.qcow2")" 'BEGIN { print b / 1073741824 }')
    for target in $TARGETS; do
        is_s3 "$target" || continue
        for scenario in full restore; do
            n=$(value "$target" "${scenario}_requests")
            record "$target" "${scenario}_per_gib" "$(awk -v n="$n" -v g="$gib" 'BEGIN { printf "%.0f", n / g }')"
        done
    done
}

print_table() {
    python3 - "$RESULTS" $TARGETS <<'PY'
import csv, sys
results, targets = sys.argv[1], sys.argv[2:]
data = {}
with open(results, newline="") as f:
    for target, metric, value in csv.reader(f, delimiter="\t"):
        data.setdefault(target, {})[metric] = value
rows = [
    ("full_time", "Full backup, time (s)"),
    ("full_rss", "Full backup, peak RSS (MiB)"),
    ("full_requests", "Full backup, S3 requests"),
    ("full_per_gib", "Full backup, S3 requests per GiB of image data"),
    ("changed_time", "Incremental (1% changed), time (s)"),
    ("changed_requests", "Incremental, S3 requests"),
    ("restore_time", "Restore, time (s)"),
    ("restore_rss", "Restore, peak RSS (MiB)"),
    ("restore_requests", "Restore, S3 requests"),
    ("restore_per_gib", "Restore, S3 requests per GiB of image data"),
    ("restore_check", "Restored image equals source"),
]
def fmt(v):
    try:
        x = float(v)
    except ValueError:
        return v
    return f"{x:.0f}" if x >= 100 or x == int(x) else f"{x:.2f}"
print("| Scenario | " + " | ".join(targets) + " |")
print("|---|" + "---:|" * len(targets))
for key, label in rows:
    print(f"| {label} | " + " | ".join(fmt(data.get(t, {}).get(key, "-")) for t in targets) + " |")
PY
}

write_remote_header() {
    {
        echo "## vbackup storage targets, $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo
        echo "- Machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r)"
        echo "- $("$VBACKUP_BIN" --version) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no commit')), $(restic version | cut -d' ' -f1-2), garage $("$GARAGE_BIN" --version | cut -d' ' -f2) (one node, sqlite, on loopback, same disk)"
        echo "- Image: ${SIZE_MIB} MiB virtual qcow2 ($(mib "$(stat -c %s "$IMG_DIR/base.qcow2")" | xargs printf '%.0f') MiB file), ext4 filled from $SRC"
        echo "- Change: $(cat "$RUN/change.txt"), seed $SEED"
        echo "- Targets: $TARGETS"
    } >"$RUN/header.md"
}

cleanup_remote() {
    stop_garage
    stop_server
    cleanup
}

main_remote() {
    ensure_deps
    command -v curl >/dev/null || die "curl is needed to read Garage's metrics"
    configure
    ensure_vbackup
    ensure_images
    prepare_run
    trap cleanup_remote EXIT
    if [[ " $TARGETS " == *" garage"* || " $TARGETS " == *" restic-garage "* ]]; then
        start_garage
    fi
    if [[ " $TARGETS " == *" server "* ]]; then
        start_server
    fi
    local target
    for target in $TARGETS; do run_target "$target"; done
    derive_per_gib
    write_remote_header
    mkdir -p "$BENCH_DIR/results"
    { cat "$RUN/header.md"; echo; print_table; } | tee "$BENCH_DIR/results/remote-latest.md"
    if grep -q $'\trestore_check\tFAIL' "$RESULTS"; then
        die "a restored image differs from its source"
    fi
}

main_remote "$@"
