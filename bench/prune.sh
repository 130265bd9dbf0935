#!/usr/bin/env bash
# Benchmark of `vbackup prune` on a large synthetic repository: at least a
# million chunk objects and a thousand snapshots, most of them forgotten.
# Measures wall time and peak RSS (`/usr/bin/time -f '%e %M'`) of:
#   1. forget --keep-last K (per VM)
#   2. prune (default grace): marks the unreferenced objects, deletes nothing
#   3. prune --grace 0: sweeps the list marked in 2 (the deleting run)
#   4. prune --grace 0 again: nothing left to do (a metadata-only pass)
#   5. check (structure only)
# Prints a markdown table and writes it to bench/results/prune-latest.md.
#
# Environment (all optional):
#   PRUNE_CHUNKS     chunk objects to synthesize (default 1000000)
#   PRUNE_SNAPSHOTS  snapshots (default 1000); snapshot i references chunks
#                    [i*C/S, i*C/S + 2*C/S), so each chunk is in two snapshots
#   PRUNE_VMS        VMs the snapshots are spread over (default 10)
#   PRUNE_KEEP       --keep-last per VM (default 10: 100 of 1000 kept)
#   PRUNE_THREADS    --threads for every vbackup command (default: vbackup's)
#   BENCH_KEEP=1     keep the repository in bench/work/prune-*
#   BENCH_NO_BUILD=1 do not run cargo build; VBACKUP_BIN and SYNTH_BIN name
#                    the binaries (vbackup, and bench/synth's vbackup-synth)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")
CHUNKS=${PRUNE_CHUNKS:-1000000}
SNAPSHOTS=${PRUNE_SNAPSHOTS:-1000}
VMS=${PRUNE_VMS:-10}
KEEP=${PRUNE_KEEP:-10}
VBACKUP_BIN=${VBACKUP_BIN:-$ROOT/target/release/vbackup}
SYNTH_BIN=${SYNTH_BIN:-$ROOT/target/release/vbackup-synth}
WORK=$BENCH_DIR/work/prune-$$

log() { printf '[prune-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

[[ -x /usr/bin/time ]] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null; }
if [[ ${BENCH_NO_BUILD:-0} != 1 ]]; then
    log "cargo build --release -p vbackup-cli -p vbackup-synth"
    (cd "$ROOT" && cargo build --quiet --release -p vbackup-cli -p vbackup-synth)
fi
mkdir -p "$WORK" "$BENCH_DIR/results"
cleanup() { [[ ${BENCH_KEEP:-0} == 1 ]] || rm -rf "$WORK"; }
trap cleanup EXIT

export VBACKUP_REPOSITORY=$WORK/repo VBACKUP_PASSWORD=prune-bench
THREADS=()
[[ -n ${PRUNE_THREADS:-} ]] && THREADS=(--threads "$PRUNE_THREADS")
vb() { "$VBACKUP_BIN" "${THREADS[@]}" "$@"; }

# Runs vbackup under /usr/bin/time; prints "seconds peak-KiB", keeps stdout.
measure() {
    local name=$1; shift
    /usr/bin/time -f '%e %M' -o "$WORK/$name.time" "$VBACKUP_BIN" "${THREADS[@]}" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" \
        || { cat "$WORK/$name.err" >&2; exit 1; }
    cat "$WORK/$name.time"
}

count_chunks() { find "$WORK/repo/chunks" -type f ! -name '.*' | wc -l; }

log "init (64 KiB chunks) and synthesize $CHUNKS chunks, $SNAPSHOTS snapshots of $VMS VMs"
vb init --chunk-size 64K >/dev/null
start=$(date +%s.%N)
"$SYNTH_BIN" ${PRUNE_THREADS:+--threads "$PRUNE_THREADS"} --chunks "$CHUNKS" --snapshots "$SNAPSHOTS" --vms "$VMS" >&2
synth_s=$(printf "%.1f" "$(echo "$(date +%s.%N) - $start" | bc)")
before=$(count_chunks)
log "$before chunk objects; forget --keep-last $KEEP"
read -r forget_s forget_kib < <(measure forget forget --keep-last "$KEEP")
log "prune (default grace: mark only)"
read -r mark_s mark_kib < <(measure mark --json prune)
log "prune --grace 0 (sweep)"
read -r sweep_s sweep_kib < <(measure sweep --json prune --grace 0)
log "prune --grace 0 again (nothing to do)"
read -r idle_s idle_kib < <(measure idle --json prune --grace 0)
log "check (structure)"
read -r check_s check_kib < <(measure check check)
after=$(count_chunks)
python3 - "$WORK" <<'PY' >&2
import json, sys
w = sys.argv[1]
for name in ("mark", "sweep"):
    r = json.load(open(f"{w}/{name}.out"))
    print(name, {k: r[k] for k in ("snapshots", "chunks", "marked-chunks", "deleted-chunks", "freed-bytes", "referenced-chunks")})
PY

mib() { echo "scale=1; $1 / 1024" | bc; }
table=$(cat <<MD
| step (${before} chunk objects, ${SNAPSHOTS} snapshots, keep-last ${KEEP} of ${VMS} VMs) | wall time (s) | peak RSS (MiB) |
|---|---:|---:|
| synthesize (\`bench/synth\`) | ${synth_s} | - |
| forget --keep-last ${KEEP} | ${forget_s} | $(mib "$forget_kib") |
| prune, default grace: mark only | ${mark_s} | $(mib "$mark_kib") |
| prune --grace 0: sweep, $((before - after)) chunks deleted | ${sweep_s} | $(mib "$sweep_kib") |
| prune --grace 0 again: nothing to do | ${idle_s} | $(mib "$idle_kib") |
| check (structure, no data read) | ${check_s} | $(mib "$check_kib") |
MD
)
echo "$table" | tee "$BENCH_DIR/results/prune-latest.md"
log "chunk objects: $before before, $after after"
