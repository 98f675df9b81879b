#!/usr/bin/env bash
# Instant restore against a plain restore of the same point (issue 13):
#
#   first-read   `cbt restore --instant` from the command to the first
#                successful NBD read of the restored disk (nbdinfo --size
#                then a 4 KiB read at the end of the disk, retried until it
#                succeeds)
#   standalone   `cbt restore --instant` from the command until status
#                says the copy is complete (a standalone image, synced)
#   restore      `cbt restore` of the same point to a raw file (checksums
#                checked, output synced): what the user waits for without
#                instant restore before the VM can start
#
# One image of random data (SIZE_MIB, default 1024), one full backup made
# by the real daemon; each round restores it both ways into fresh outputs,
# the order alternating from round to round.  The repository's files are
# dropped from the page cache (POSIX_FADV_DONTNEED) before each restore.
#
#   ninja -C build && bash bench/instant-restore.sh     # ROUNDS=3
#
# Needs jq and Debian's python3-libnbd (/usr/bin/python3).
#
# Environment: ROUNDS, SIZE_MIB, CBT_BUILD_DIR (default build), TMPDIR
# (needs about 4x SIZE_MIB free).  Medians are printed at the end.

set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
build=${CBT_BUILD_DIR:-$src/build}
cbt=$build/cbt/cbt
filterd=$build/filterd/cbt-filterd
rounds=${ROUNDS:-3}
size_mib=${SIZE_MIB:-1024}
export CBT_FILTERD=$filterd

for t in jq python3; do
    command -v "$t" >/dev/null || { echo "instant-restore: needs $t" >&2; exit 1; }
done
[ -x "$cbt" ] && [ -x "$filterd" ] || { echo "instant-restore: build first (ninja -C $build)" >&2; exit 1; }

dir=$(mktemp -d "${TMPDIR:-/tmp}/cbt-instant-bench.XXXXXX")
pids=()
cleanup()
{
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print('%.2f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$1" "$2"; }
drop_cache() {
    python3 - "$@" <<'PY'
import os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
PY
}
ctl() {
    python3 - "$1" "$2" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(sys.argv[1])
f = s.makefile("rw")
f.write(sys.argv[2] + "\n")
f.flush()
print(f.readline().rstrip("\n"))
PY
}

# ---- the backup ----------------------------------------------------------
echo "instant-restore: writing a ${size_mib} MiB image of random data"
head -c $((size_mib << 20)) /dev/urandom >"$dir/disk.img"
"$filterd" --image "$dir/disk.img" --format raw --socket "$dir/d.sock" \
    --bitmap "$dir/disk.bm" --control "$dir/d.ctl" --pid-file "$dir/d.pid" 2>"$dir/d.log" &
pids+=($!)
for _ in $(seq 300); do [ -s "$dir/d.pid" ] && break; sleep 0.1; done
"$cbt" backup --socket "$dir/d.sock" --control "$dir/d.ctl" --repo "$dir/repo" --full \
    --quiet >/dev/null
kill -TERM "${pids[0]}"
wait "${pids[0]}" || true
files=("$dir"/repo/*.qcow2)

declare -a first_t stand_t plain_t

instant_round()
{
    local out=$dir/instant.qcow2 t0 t1 t2 p
    rm -f "$out" "$out".* "$dir/i.sock" "$dir/i.ctl" "$dir/i.pid"
    drop_cache "${files[@]}"
    t0=$(now)
    "$cbt" restore --instant --repo "$dir/repo" --output "$out" --socket "$dir/i.sock" \
        --control "$dir/i.ctl" --pid-file "$dir/i.pid" >"$dir/i.log" 2>&1 &
    p=$!
    pids+=("$p")
    until /usr/bin/python3 -c '
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pread(4096, h.get_size() - 4096)' "nbd+unix:///?socket=$dir/i.sock" >/dev/null 2>&1; do
        kill -0 "$p" 2>/dev/null || { cat "$dir/i.log" >&2; exit 1; }
        sleep 0.01
    done
    t1=$(now)
    until ctl "$dir/i.ctl" '{"execute":"status"}' | jq -e '.return.restore.complete' >/dev/null; do
        sleep 0.05
    done
    t2=$(now)
    kill -TERM "$p"
    wait "$p" || true
    first_t+=("$(elapsed "$t0" "$t1")")
    stand_t+=("$(elapsed "$t0" "$t2")")
    echo "instant-restore: instant: first read $(elapsed "$t0" "$t1") s, standalone $(elapsed "$t0" "$t2") s"
}

plain_round()
{
    local out=$dir/plain.raw t0 t1
    rm -f "$out"
    drop_cache "${files[@]}"
    t0=$(now)
    "$cbt" restore --repo "$dir/repo" --output "$out" --quiet
    sync "$out"
    t1=$(now)
    plain_t+=("$(elapsed "$t0" "$t1")")
    echo "instant-restore: cbt restore: $(elapsed "$t0" "$t1") s"
}

for (( r = 1; r <= rounds; r++ )); do
    if (( r % 2 )); then instant_round; plain_round; else plain_round; instant_round; fi
done

median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
m1=$(median "${first_t[@]}")
m2=$(median "${stand_t[@]}")
m3=$(median "${plain_t[@]}")
echo
echo "median of $rounds round(s), ${size_mib} MiB point"
printf '%-40s %8s s\n' "instant: command to first NBD read" "$m1"
printf '%-40s %8s s\n' "instant: command to standalone image" "$m2"
printf '%-40s %8s s\n' "cbt restore (raw, checksums, synced)" "$m3"
python3 -c "import sys; a, b, c = map(float, sys.argv[1:]); print('first read / cbt restore   %.3f' % (a / c)); print('standalone / cbt restore    %.2f' % (b / c))" "$m1" "$m2" "$m3"
