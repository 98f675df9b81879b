#!/usr/bin/env bash
# Backups and restores against the tools of the field (issue 11), ratios
# from one run:
#
#   full         `cbt backup --full` (point-in-time view, qcow2 file,
#                XXH128 of every chunk -- the directory default; SHA-256
#                before it existed --, fsync, manifest, checkpoint
#                commit)  vs  `nbdcopy --flush` of the same daemon's export
#                to a raw file
#   restore      `cbt restore` of the chain full + incremental to a raw file
#                (checksums checked)  vs  `qemu-img convert -O raw` of the
#                same chain (the incremental's file; qemu follows its
#                backing file), followed by `sync` of the output
#   restore-nv   the same with `cbt restore --no-verify`, against the same
#                qemu-img runs
#   verify       `cbt verify` of the repository  vs  `cat` of its files to
#                /dev/null
#   incremental  `cbt backup --incremental` after 1% of the disk (328
#                random 64 KiB blocks) was written  vs  the full backup of
#                the same round
#
# One image, written once from /dev/urandom (2 GiB, fully allocated),
# served by one cbt-filterd (--bitmap, --control) for the whole run.  A
# round: a fresh repository; full and nbdcopy; 1% written; incremental;
# restore, restore-nv and qemu-img; verify and cat; the repository is
# deleted.  In every pair the side that goes first alternates from round
# to round, so both see the same background load on average.
#
# Page cache: the image is read once before the copies (the daemon reads
# it warm, as it would a busy VM's disk); the repository's files are
# dropped from the cache (POSIX_FADV_DONTNEED, dd iflag=nocache) before
# each restore, qemu-img, verify and cat, so those read from the disk.
# Every output is synced inside its timing.
#
#   ninja -C build                     # the script builds nothing
#   bash bench/backup-compare.sh       # ROUNDS=3 by default
#
# Environment: ROUNDS, SIZE_MIB (default 2048), CBT_BUILD_DIR (default
# build), TMPDIR (where image, repositories and outputs go: needs about
# 3x SIZE_MIB free, on the disk you want to measure).
#
# The medians of ROUNDS runs and the ratios are printed; every run is
# printed as it happens.  Timing is wall clock (date +%s.%N).  With each
# run the CPU seconds (user + system) of the command and of the daemon
# during it are printed too: on a loaded machine the scheduler shares the
# CPUs by demand, so the CPU a side needs, more than its wall time, says
# how it will fare (cbt backup hashes every byte, with XXH128 now and
# SHA-256 before; nbdcopy hashes nothing).

set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
build=${CBT_BUILD_DIR:-$src/build}
cbt=$build/cbt/cbt
filterd=$build/filterd/cbt-filterd
rounds=${ROUNDS:-3}
size_mib=${SIZE_MIB:-2048}

for t in nbdcopy qemu-img qemu-io dd python3; do
    command -v "$t" >/dev/null || { echo "backup-compare: needs $t" >&2; exit 1; }
done
[ -x "$cbt" ] && [ -x "$filterd" ] || { echo "backup-compare: build first (ninja -C $build)" >&2; exit 1; }

dir=$(mktemp -d "${TMPDIR:-/tmp}/cbt-backup-compare.XXXXXX")
dpid=
cleanup()
{
    [ -n "$dpid" ] && kill "$dpid" 2>/dev/null && wait "$dpid" 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT

img=$dir/disk.img
sock=$dir/nbd.sock
ctl=$dir/ctl.sock
uri="nbd+unix:///?socket=$sock"
echo "backup-compare: writing a ${size_mib} MiB image of random data in $dir"
head -c $((size_mib << 20)) /dev/urandom >"$img"
sync "$img"
"$filterd" --image "$img" --bitmap "$dir/disk.bitmap" --control "$ctl" --socket "$sock" \
    --pid-file "$dir/pid" >"$dir/filterd.log" 2>&1 &
dpid=$!
for _ in $(seq 100); do [ -s "$dir/pid" ] && break; sleep 0.1; done
[ -S "$sock" ] || { cat "$dir/filterd.log"; echo "backup-compare: daemon did not start" >&2; exit 1; }

# uncache FILE...: drop the files from the page cache (after syncing them).
uncache()
{
    local f
    for f in "$@"; do
        sync "$f"
        dd if="$f" iflag=nocache count=0 status=none
    done
}
warm() { cat "$img" >/dev/null; }

declare -A times cpus dcpus
# cpu_of PID: user + system CPU seconds of process PID so far, all threads.
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat"; }
# run NAME CMD...: time CMD (wall; CPU of CMD and of the daemon), append
# to times[NAME], cpus[NAME] and dcpus[NAME], print them.
run()
{
    local name=$1 s e t c d0 d1 rc=0 TIMEFORMAT='%3U %3S'
    shift
    d0=$(cpu_of "$dpid")
    s=$(date +%s.%N)
    { time "$@" >"$dir/last.log" 2>&1 || rc=$?; } 2>"$dir/cpu"
    e=$(date +%s.%N)
    d1=$(cpu_of "$dpid")
    (( rc == 0 )) || { cat "$dir/last.log"; echo "backup-compare: $name failed" >&2; exit 1; }
    t=$(python3 -c "print(f'{$e - $s:.3f}')")
    c=$(awk '{ printf "%.2f", $1 + $2 }' "$dir/cpu")
    d1=$(python3 -c "print(f'{$d1 - $d0:.2f}')")
    times[$name]="${times[$name]:-} $t"
    cpus[$name]="${cpus[$name]:-} $c"
    dcpus[$name]="${dcpus[$name]:-} $d1"
    printf '  %-12s %8.3f s   cpu %5.2f s, daemon %5.2f s\n' "$name" "$t" "$c" "$d1"
}

# dirty_1pct: write 1% of the disk as random 64 KiB blocks.
dirty_1pct()
{
    local n=$(( (size_mib << 20) / 100 / 65536 )) args=() i
    for (( i = 0; i < n; i++ )); do
        args+=(-c "write -P $(( (i % 254) + 1 )) $(( (RANDOM * 32768 + RANDOM) % (size_mib * 16) * 65536 )) 64k")
    done
    qemu-io -f raw "$uri" "${args[@]}" >/dev/null
}

full_cbt() { rm -rf "$repo"; "$cbt" backup -q --socket "$sock" --control "$ctl" --repo "$repo" --full; }
full_nbdcopy() { rm -f "$dir/copy.raw"; nbdcopy --flush "$uri" "$dir/copy.raw"; }
inc_cbt() { "$cbt" backup -q --socket "$sock" --control "$ctl" --repo "$repo" --incremental; }
restore_cbt() { rm -f "$dir/out.raw"; "$cbt" restore -q --repo "$repo" --output "$dir/out.raw" "$@"; }
restore_qemu() { rm -f "$dir/out.raw"; qemu-img convert -O raw "$repo/$newest" "$dir/out.raw"; sync "$dir/out.raw"; }
verify_cbt() { "$cbt" verify -q --repo "$repo"; }
cat_files() { cat "$repo"/*.qcow2 >/dev/null; }

echo "backup-compare: load before: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs"
for (( r = 1; r <= rounds; r++ )); do
    echo "round $r of $rounds"
    repo=$dir/repo
    warm
    if (( r % 2 )); then
        run full full_cbt; warm; run nbdcopy full_nbdcopy
    else
        run nbdcopy full_nbdcopy; warm; run full full_cbt
    fi
    rm -f "$dir/copy.raw"
    dirty_1pct
    run incremental inc_cbt
    newest=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['backups'][-1]['file'])" "$repo/manifest.json")
    files=("$repo"/*.qcow2)
    for side in $( (( r % 2 )) && echo "cbt nv qemu" || echo "qemu nv cbt"); do
        uncache "${files[@]}"
        case $side in
            cbt) run restore restore_cbt ;;
            nv) run restore-nv restore_cbt --no-verify ;;
            qemu) run qemu-img restore_qemu ;;
        esac
        rm -f "$dir/out.raw"
    done
    for side in $( (( r % 2 )) && echo "cbt cat" || echo "cat cbt"); do
        uncache "${files[@]}"
        case $side in
            cbt) run verify verify_cbt ;;
            cat) run cat cat_files ;;
        esac
    done
    rm -rf "$repo"
done
echo "backup-compare: load after: $(cut -d' ' -f1-3 /proc/loadavg)"

med() { tr ' ' '\n' <<<"${times[$1]}" | sed '/^$/d' | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
echo
echo "medians of $rounds rounds (${size_mib} MiB image):"
for k in full nbdcopy incremental restore restore-nv qemu-img verify cat; do
    printf '  %-12s %8.3f s   (%s )\n' "$k" "$(med $k)" "${times[$k]}"
done
medof() { tr ' ' '\n' <<<"$1" | sed '/^$/d' | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
echo "CPU seconds, medians (the command / the daemon during it):"
for k in full nbdcopy; do
    printf '  %-12s %6.2f / %5.2f\n' "$k" "$(medof "${cpus[$k]}")" "$(medof "${dcpus[$k]}")"
done
echo "ratios (target in brackets):"
echo "  full backup / nbdcopy          $(ratio "$(med full)" "$(med nbdcopy)")   [<= 1.0]"
echo "  restore / qemu-img convert     $(ratio "$(med restore)" "$(med qemu-img)")   [<= 1.0]"
echo "  restore --no-verify / qemu-img $(ratio "$(med restore-nv)" "$(med qemu-img)")"
echo "  verify / cat                   $(ratio "$(med verify)" "$(med cat)")   [~1.0: the disk's read speed]"
echo "  incremental (1%) / full        $(ratio "$(med incremental)" "$(med full)")   [<= 0.05]"
# pairwise A B: the ratio of the two sides within each round (they ran
# back to back, so they shared that moment's load), and its median.
pairwise()
{
    python3 - "${times[$1]}" "${times[$2]}" <<'PY'
import statistics, sys
r = [float(a) / float(b) for a, b in zip(sys.argv[1].split(), sys.argv[2].split())]
print(" ".join(f"{x:.2f}" for x in r), f"(median {statistics.median(r):.2f})")
PY
}
echo "ratios within each round:"
echo "  full backup / nbdcopy          $(pairwise full nbdcopy)"
echo "  restore / qemu-img convert     $(pairwise restore qemu-img)"
echo "  verify / cat                   $(pairwise verify cat)"
