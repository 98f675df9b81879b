#!/usr/bin/env bash
# Regenerate the seed corpora in fuzz/corpus/ from the real tools:
# qemu-img/qemu-io for qcow2 images and backing chains, cbt-filterd and
# `cbt bitmap create` for bitmap files, real `cbt backup` runs for
# manifests, and the control lines the tests send.  The seeds are
# committed; run this only to refresh them (then review the diff).
#
#   fuzz/gen-corpus.sh [BUILDDIR]     default: build (a normal gcc build
#                                     is fine: only the daemon and CLI run)
#
# Needs qemu-img, qemu-io, jq and python3.  The file formats of the
# inputs (separators, mode bytes) are described at the top of each
# fuzz/fuzz-NAME.c.
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$src/build}" && pwd)
export CBT_SOURCE_DIR=$src CBT_BUILD_DIR=$build
export CBT_FILTERD=$build/filterd/cbt-filterd CBT_CLI=$build/cbt/cbt
# shellcheck source=../tests/functions.sh
. "$src/tests/functions.sh"
requires qemu-img qemu-io jq

corpus=$src/fuzz/corpus
SEP='CBTFUZZ|'

# ---- qcow2: 0.qcow2, then its backing files 1.qcow2 and 2.qcow2 --------
q=$corpus/qcow2
rm -rf "$q"
mkdir -p "$q"
cd "$tmp"

img() { qemu-img create -q -f qcow2 "$@"; }
io() { qio -f qcow2 "$@"; }
# seed NAME FILE...: the files joined with the separator.
seed() {
    local name=$1 f first=1
    shift
    for f in "$@"; do
        [ $first = 1 ] || printf '%s' "$SEP"
        cat "$f"
        first=0
    done >"$q/$name"
}

# A 1 MiB disk in 4 KiB clusters: data, a zero cluster, a compressed one.
img -o cluster_size=4k 0.qcow2 1M
io -c 'write -P 0xaa 0 8k' -c 'write -z 64k 4k' -c 'write -c -P 0x33 128k 4k' \
   -c 'write -P 0x55 1020k 4k' 0.qcow2
seed plain-4k 0.qcow2

# 512-byte clusters, a partial write, an unaligned one.
img -o cluster_size=512 0.qcow2 1M
io -c 'write -P 0x11 1000 3000' -c 'write -z 8k 1k' -c 'write -c -P 0x22 16k 512' 0.qcow2
seed plain-512 0.qcow2

# Version 2 (compat=0.10): no zero flag, no header extensions area.
img -o cluster_size=512,compat=0.10 0.qcow2 2M
io -c 'write -P 0x66 4k 2k' -c 'write -c -P 0x67 64k 512' 0.qcow2
seed v2 0.qcow2

# A persistent bitmap (bitmaps header extension, autoclear bit) and an
# internal snapshot (opens read-only only).
img -o cluster_size=512 0.qcow2 1M
io -c 'write -P 0x77 0 1k' 0.qcow2
qemu-img bitmap --add 0.qcow2 b0
seed bitmap-ext 0.qcow2
qemu-img snapshot -c s1 0.qcow2
io -c 'write -P 0x78 0 512' 0.qcow2
seed snapshot 0.qcow2

# A backing chain 0 -> 1 -> 2 (qcow2), and 0 -> 1 (raw, shorter than 0).
img -o cluster_size=512 2.qcow2 1M
io -c 'write -P 0x01 0 2k' -c 'write -c -P 0x02 64k 512' 2.qcow2
img -o cluster_size=512 -b 2.qcow2 -F qcow2 1.qcow2 1M
io -c 'write -P 0x03 1k 512' -c 'write -z 8k 4k' 1.qcow2
img -o cluster_size=512 -b 1.qcow2 -F qcow2 0.qcow2 1M
io -c 'write -P 0x04 1536 1k' -c 'write -z -u 12k 4k' 0.qcow2
seed chain-3 0.qcow2 1.qcow2 2.qcow2
head -c 3000 /dev/urandom >raw
img -o cluster_size=512 -b 1.qcow2 -F raw 0.qcow2 1M
io -c 'write -P 0x05 2k 512' 0.qcow2
seed chain-raw 0.qcow2 raw
rm -f 0.qcow2 1.qcow2 2.qcow2 raw

# ---- bitmap files: a mode byte (fuzz-bitmap-file.c), then the file -----
b=$corpus/bitmap-file
rm -rf "$b"
mkdir -p "$b"
# bmseed NAME FILE: two seeds, checksums as they are (mode 0) and the
# writable session with checksums fixed (mode 3).
bmseed() {
    { printf '\x00'; cat "$2"; } >"$b/$1"
    { printf '\x03'; cat "$2"; } >"$b/$1-rw"
}
truncate -s 64M disk.raw
cbt bitmap create created.bitmap --image disk.raw --granularity 512K >/dev/null
bmseed created created.bitmap

# The daemon's files: written to, with a checkpoint in progress, then
# stopped cleanly or killed (not clean, crash-safe or lazy).
for mode in crash-safe lazy; do
    start_filterd --image memory:4M --bitmap "daemon-$mode.bitmap" --granularity 64K \
        --tracking "$mode" --control "$tmp/ctl-$mode"
    qio -f raw -c 'write -P 0x12 0 64k' -c 'write -P 0x13 1M 8k' "$uri"
    ctl "$tmp/ctl-$mode" '{"execute":"checkpoint-begin"}' >/dev/null
    qio -f raw -c 'write -P 0x14 2M 4k' "$uri"
    if [ "$mode" = lazy ]; then
        stop_filterd
        bmseed "daemon-clean" "daemon-$mode.bitmap"
    else
        kill -KILL "$pid"
        wait "$pid" 2>/dev/null || true
        bmseed "daemon-killed-$mode" "daemon-$mode.bitmap"
    fi
done

# ---- manifests: real backups, full then incremental ----------------------
# one-full is SHA-256 (version 1), old-format-one-full the same as cbt
# wrote it before the "checksum" field, full-two-inc a chain that mixes
# SHA-256 and XXH128 (version 2), two-chains adds an XXH128 full.  The
# regress-* seeds (fuzz findings, README.md) are not made here: kept.
m=$corpus/manifest
mkdir -p "$m"
find "$m" -type f ! -name 'regress-*' -delete
start_filterd --image memory:4M --bitmap "$tmp/m.bitmap" --control "$tmp/ctl-m"
msock=$sock
qio -f raw -c 'write -P 0x21 0 64k' "$uri"
cbt backup --socket "$msock" --control "$tmp/ctl-m" --repo "$tmp/repo" \
    --checksum sha256 >/dev/null 2>&1
cp "$tmp/repo/manifest.json" "$m/one-full"
jq 'del(.backups[].checksum)' "$tmp/repo/manifest.json" >"$m/old-format-one-full"
for i in 1 2; do
    qio -f raw -c "write -P 0x2$i ${i}M 4k" "$uri"
    cbt backup --socket "$msock" --control "$tmp/ctl-m" --repo "$tmp/repo" \
        --incremental >/dev/null 2>&1
done
cp "$tmp/repo/manifest.json" "$m/full-two-inc"
cbt backup --socket "$msock" --control "$tmp/ctl-m" --repo "$tmp/repo" --full >/dev/null 2>&1
cp "$tmp/repo/manifest.json" "$m/two-chains"
jq -c . "$tmp/repo/manifest.json" >"$m/two-chains-compact"
stop_filterd

# ---- control lines: what the tests and cbt backup send -------------------
c=$corpus/control
rm -rf "$c"
mkdir -p "$c"
# The fuzz target's checkpoint ids are all c0ffee00c0ffee00 (see
# fuzz-control.c), so a commit with that id succeeds.
id=c0ffee00c0ffee00
printf '%s\n' '{"execute":"status","id":"x1"}' >"$c/status"
printf '%s\n' '{"execute":"checkpoint-begin"}' '{"execute":"status"}' \
    "{\"execute\":\"checkpoint-commit\",\"arguments\":{\"checkpoint\":\"$id\"}}" >"$c/begin-commit"
printf '%s\n' '{"execute":"checkpoint-begin","arguments":{"point-in-time":"full"}}' \
    '{"execute":"status","id":7}' "{\"execute\":\"checkpoint-abort\",\"arguments\":{\"checkpoint\":\"$id\"}}" \
    >"$c/pit-full-abort"
printf '%s\n' '{"execute":"checkpoint-begin","arguments":{"point-in-time":"incremental"}}' \
    '{"execute":"checkpoint-begin"}' '{"execute":"checkpoint-commit","arguments":{"checkpoint":"0000000000000001"}}' \
    '{"execute":"checkpoint-abort"}' '{"execute":"checkpoint-abort"}' >"$c/pit-inc-errors"
printf '%s\n' 'not json' '[1,2]' '{"execute":42}' '{"execute":"frobnicate"}' \
    '{"execute":"status","arguments":[]}' \
    '{"execute":"checkpoint-commit","arguments":{"checkpoint":"xyz"}}' \
    '{"execute":"checkpoint-commit"}' '{"execute":"status"}' >"$c/malformed"
printf '{"execute":"status"}\r\n\n\0{"execute":"status"}\n' >"$c/cr-blank-nul"

# ---- NBD requests: the caps prefix, then requests (fuzz-nbd-request.c) ---
n=$corpus/nbd-request
rm -rf "$n"
mkdir -p "$n"
"$PYTHON" - "$n" <<'PYEOF'
import struct, sys
out = sys.argv[1]
MAGIC = 0x25609513
def caps(size, max_block, ro=False, structured=True, fast_zero=True, meta=1):
    flags = ro | structured << 1 | fast_zero << 2 | meta << 4
    return struct.pack(">QIB3x", size, max_block, flags)
def req(typ, off, length, flags=0, cookie=1, payload=True):
    b = struct.pack(">IHHQQI", MAGIC, flags, typ, cookie, off, length)
    if typ == 1 and payload:
        b += bytes([0x5a]) * length
    return b
M = 64 << 20
seeds = {
    # what qemu-io and nbdcopy send on a read-write export
    "rw-session": caps(M, 32 << 20) + req(0, 0, 4096) + req(1, 4096, 512, 1) +
        req(6, 8192, 65536, 2 | 16) + req(4, 1 << 20, 1 << 20) + req(5, 0, 1 << 20) +
        req(7, 0, M, 8) + req(3, 0, 0) + req(2, 0, 0),
    # the point-in-time view: read-only, release by TRIM
    "readonly": caps(M, 32 << 20, ro=True, fast_zero=False) + req(0, M - 512, 512, 4) +
        req(1, 0, 512) + req(4, 0, 65536) + req(6, 0, 512),
    # the edges: a range ending at the export's end, one past it, overflow
    "edges": caps(M, 65536, structured=False, meta=0) + req(0, M - 65536, 65536) +
        req(0, M - 65535, 65536) + req(0, (1 << 64) - 512, 4096) +
        req(0, 0, 65537) + req(7, 0, 512) + req(9, 0, 0) + req(3, 0, 0, 1),
}
for name, data in seeds.items():
    with open(f"{out}/{name}", "wb") as f:
        f.write(data)
PYEOF

echo "seeds written to $corpus:"
for d in "$corpus"/*/; do
    printf '  %-12s %3d files, %s\n' "$(basename "$d")" "$(find "$d" -type f | wc -l)" \
        "$(du -sh "$d" | cut -f1)"
done
