#!/usr/bin/env bash
# cbt bitmap resize after the image was resized behind a stopped daemon:
# the daemon refuses the bitmap (size changed), `cbt bitmap resize` makes
# it fit, and the restarted daemon reports over NBD (nbdinfo --map) the
# old dirty bits kept and, after growing, the whole new area dirty; after
# shrinking, the bits past the new end gone.  Also: another image (inode
# differs) exit 4, a running daemon or a crashed file refused unless
# --force, damaged files exit 4, usage errors exit 2.

source "$(dirname "$0")/functions.sh"
requires nbdinfo qemu-io jq timeout
[ -x "$CBT_CLI" ] || die "cbt CLI $CBT_CLI not found (build it: ninja -C build)"

# map_is EXPECTED: the daemon's dirty map (nbdinfo) and cbt bitmap dump of
# the stopped daemon's file agree with EXPECTED.
map_is()
{
    local got
    got=$(dirty_map)
    [ "$got" = "$1" ] || die "nbdinfo dirty map: expected
$1
got
$got"
}

dump_is()
{
    local got
    got=$(cbt bitmap dump -q "$bm")
    [ "$got" = "$1" ] || die "cbt bitmap dump $bm: expected
$1
got
$got"
}

# The daemon must refuse $bm for $disk at start-up, naming TEXT.
refused()
{
    local rc=0
    out=$(timeout 30 "$CBT_FILTERD" --image "$disk" --socket "$tmp/refused.sock" \
              --pid-file "$tmp/refused.pid" --bitmap "$bm" 2>&1 </dev/null) || rc=$?
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || die "cbt-filterd did not refuse $bm (exit $rc)"
    has "$1"
}

M=1048576
disk=$tmp/disk.img
bm=$tmp/disk.bm
# 10 MiB + 4 KiB: the last 64 KiB granule covers only 4 KiB.
truncate -s $((10 * M + 4096)) "$disk"

# ---- usage ------------------------------------------------------------------
expect_rc 0 cbt bitmap --help
has "cbt bitmap resize PATH --image IMG"
expect_rc 0 cbt bitmap resize --help
has "marks the new"
expect_rc 2 cbt bitmap resize "$bm"
has "--image IMG is required"
expect_rc 2 cbt bitmap resize --image "$disk"
has "missing PATH"
expect_rc 2 cbt bitmap resize --image "$disk" a b
expect_rc 1 cbt bitmap resize "$tmp/missing.bm" --image "$disk"
has "cannot open"

# ---- the daemon writes some bits ---------------------------------------------
start_filterd --image "$disk" --bitmap "$bm" --tracking lazy --granularity 64K
qio -f raw "$uri" -c 'write -P 1 100k 8k' -c 'write -P 2 10M 4k' -c flush
map_is "65536 65536
10485760 4096"
# In use: the file is not clean and resize keeps its hands off.
expect_rc 1 cbt bitmap resize "$bm" --image "$disk"
has "not clean: cbt-filterd may be running on it"
stop_filterd
expect_rc 0 cbt bitmap resize "$bm" --image "$disk"
has "nothing to do"

# ---- grow ---------------------------------------------------------------------
truncate -s $((20 * M)) "$disk"
refused "image size changed"
cp "$bm" "$tmp/before-grow.bm"
expect_rc 0 cbt bitmap resize "$bm" --image "$disk"
has "$bm: grew from 10.0 MiB (10489856 bytes) to 20 MiB (20971520 bytes): new area marked dirty in 1 bitmap"
expect_rc 0 cbt bitmap check "$bm" --image "$disk"
[ "$out" = "$bm: ok" ] || die "check after grow: $out"
cbt bitmap info --json "$bm" | jq -e --argjson sz $((20 * M)) '
    .clean and .image_size == $sz and .bitmaps[0].trusted' >/dev/null ||
    die "info --json after grow: expected clean, trusted, new size"
# The old bits are kept; the old partial last granule (now a whole one)
# and everything after it are dirty.
dump_is "65536 65536
10485760 10485760"
start_filterd --image "$disk" --bitmap "$bm" --tracking lazy
map_is "65536 65536
10485760 10485760"
qio -f raw "$uri" -c 'write -P 3 4M 512' -c 'read -P 0 19M 1M' -c 'write -P 4 19M 4k'
map_is "65536 65536
4194304 65536
10485760 10485760"
stop_filterd

# ---- shrink -------------------------------------------------------------------
truncate -s $((5 * M + 512)) "$disk"
refused "image size changed"
expect_rc 0 cbt bitmap resize "$bm" --image "$disk" --quiet
[ -z "$out" ] || die "--quiet printed: $out"
cbt bitmap info --json "$bm" | jq -e --argjson sz $((5 * M + 512)) '
    .clean and .image_size == $sz and .bitmaps[0].dirty_bytes == 2 * 65536' \
    >/dev/null || die "info --json after shrink"
dump_is "65536 65536
4194304 65536"
start_filterd --image "$disk" --bitmap "$bm" --tracking lazy
map_is "65536 65536
4194304 65536"
qio -f raw "$uri" -c 'write -P 5 5M 512'
map_is "65536 65536
4194304 65536
5242880 512"
stop_filterd
expect_rc 0 cbt bitmap check "$bm" --image "$disk"

# ---- another image, a crash, damage -------------------------------------------
other=$tmp/other.img
truncate -s $((8 * M)) "$other"
cp "$bm" "$tmp/keep.bm"
expect_rc 4 cbt bitmap resize "$bm" --image "$other"
has "does not belong to $other: image file replaced"
cmp "$bm" "$tmp/keep.bm" || die "resize for another image changed $bm"
expect_rc 1 cbt bitmap resize "$bm" --image "$tmp/missing.img"

start_filterd --image "$disk" --bitmap "$bm" --tracking lazy
kill -KILL "$pid"
{ wait "$pid"; } 2>/dev/null || true
truncate -s $((6 * M)) "$disk"
expect_rc 1 cbt bitmap resize "$bm" --image "$disk"
has "if it crashed, resize with --force"
expect_rc 0 cbt bitmap resize "$bm" --image "$disk" --force
has "grew from 5.0 MiB (5243392 bytes) to 6 MiB"
cbt bitmap info --json "$bm" | jq -e --argjson sz $((6 * M)) '
    .clean and .image_size == $sz and .bitmaps[0].inconsistent and
    (.bitmaps[0].trusted | not)' >/dev/null ||
    die "info --json after --force: expected clean, inconsistent, new size"
start_filterd --image "$disk" --bitmap "$bm" --tracking lazy
map_is "0 $((6 * M))"      # untrusted: all dirty
stop_filterd

cp "$tmp/before-grow.bm" "$tmp/bad.bm"
printf 'XXXX' | dd of="$tmp/bad.bm" bs=1 seek=0 conv=notrunc status=none
printf 'XXXX' | dd of="$tmp/bad.bm" bs=1 seek=4096 conv=notrunc status=none
expect_rc 4 cbt bitmap resize "$tmp/bad.bm" --image "$disk"
has "$tmp/bad.bm: not a cbt bitmap file"

echo "$progname: PASS"
