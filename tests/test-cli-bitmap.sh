#!/usr/bin/env bash
# cbt bitmap create|info|dump|check against bitmaps written by the real
# daemon: qemu-io writes at chosen offsets (unaligned, FUA, zero, discard,
# the partial last granule) show up as exactly the expected granules in
# `cbt bitmap dump` and in `nbdinfo --map=qemu:dirty-bitmap:cbt`; SIGTERM
# leaves the file clean, kill -9 leaves it not clean and a restart marks
# the entry inconsistent; corrupt and mismatched files fail `check` with
# exit 4 and are refused by the daemon without touching the image.

source "$(dirname "$0")/functions.sh"
requires qemu-io nbdinfo jq cmp timeout
[ -x "$CBT_CLI" ] || die "cbt CLI $CBT_CLI not found (build it: ninja -C build)"

# dump_is BITMAP EXPECTED [ARGS...]: cbt bitmap dump's extent lines.
dump_is()
{
    local bm=$1 want=$2 got
    shift 2
    got=$(cbt bitmap dump "$@" "$bm" | grep -v '^#')
    [ "$got" = "$want" ] || die "cbt bitmap dump $bm: expected
$want
got
$got"
}

# refused BITMAP TEXT: the daemon must exit non-zero at start-up, naming
# BITMAP and TEXT, with neither the image nor the bitmap file changed.
refused()
{
    local bm=$1 text=$2 rc=0
    cp "$bm" "$tmp/before.bm"
    out=$(timeout 30 "$CBT_FILTERD" --image "$disk" --socket "$tmp/refused.sock" \
              --pid-file "$tmp/refused.pid" --bitmap "$bm" 2>&1 </dev/null) || rc=$?
    [ "$rc" -ne 0 ] || die "cbt-filterd started with $bm"
    [ "$rc" -ne 124 ] || die "cbt-filterd with $bm did not exit (timeout)"
    has "$bm"
    has "$text"
    cmp "$disk" "$tmp/disk.copy" || die "image changed by a daemon refusing $bm"
    cmp "$bm" "$tmp/before.bm" || die "$bm changed by a daemon refusing it"
    [ ! -e "$tmp/refused.pid" ] || die "pid file written for $bm"
}

# flip FILE OFFSET: invert the byte at OFFSET.
flip()
{
    "$PYTHON" -c '
import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2]))
    b = f.read(1)
    f.seek(int(sys.argv[2]))
    f.write(bytes([b[0] ^ 0xff]))' "$1" "$2"
}

# ---- command line basics --------------------------------------------------
expect_rc 0 cbt --help
has "Exit status:"
has "4  check or verify found damage"
expect_rc 0 cbt help
expect_rc 0 cbt --version
expect_rc 0 cbt bitmap --help
has "cbt bitmap dump"
expect_rc 0 cbt help bitmap info
has "JSON keys"
expect_rc 0 cbt bitmap check --help
expect_rc 2 cbt
has "Try 'cbt --help'"
expect_rc 2 cbt frobnicate
has "unknown subcommand 'frobnicate'"
expect_rc 2 cbt --frob
expect_rc 2 cbt bitmap
expect_rc 2 cbt bitmap frob
expect_rc 2 cbt bitmap info --frob x
has "Try 'cbt bitmap info --help'"
expect_rc 2 cbt bitmap info
has "missing PATH"
expect_rc 2 cbt bitmap info a b
expect_rc 2 cbt bitmap create "$tmp/x.bm"
has "--image IMG is required"

# ---- tracking: the daemon's bits, seen by dump and by nbdinfo -------------
# 10 MiB + 4 KiB: the last 64 KiB granule covers only 4 KiB.
disk=$tmp/disk.img
truncate -s $((10 * 1048576 + 4096)) "$disk"
bm=$tmp/disk.bm

expect_rc 2 cbt bitmap create "$tmp/x.bm" --image "$disk" --granularity 1000
has "power of two"
[ ! -e "$tmp/x.bm" ] || die "bad --granularity left a file behind"

start_filterd --image "$disk" --bitmap "$bm" --tracking lazy --granularity 64K
qio -f raw "$uri" \
    -c 'write -P 1 100k 8k' \
    -c 'write -P 2 1000000 10' \
    -c 'write -P 3 1020k 8k' \
    -c 'write -f -P 4 2M 64k' \
    -c 'write -z 3M 128k' \
    -c 'discard 5M 4k' \
    -c 'write -P 5 10M 4k' \
    -c flush
#  100k+8k          -> granule 1
#  1000000+10       -> granule 15; 1020k+8k crosses 1M -> 15 and 16: merged
#  FUA 2M+64k       -> granule 32
#  zero 3M+128k     -> granules 48, 49
#  discard 5M+4k    -> granule 80
#  10M+4k           -> the partial last granule, 4 KiB long
expected="65536 65536
983040 131072
2097152 65536
3145728 131072
5242880 65536
10485760 4096"
map=$(dirty_map)
[ "$map" = "$expected" ] || die "nbdinfo dirty map: expected
$expected
got
$map"

# Read-only beside the running daemon: allowed, and not clean.
expect_rc 0 cbt bitmap info "$bm"
has "not clean: the daemon did not shut down cleanly (or is running)"
stop_filterd

dump_is "$bm" "$map"
expect_rc 0 cbt bitmap info "$bm"
has "state:           clean"
has "granularity:     64 KiB"
cbt bitmap info --json "$bm" >"$tmp/info.json"
jq -e --arg p "$bm" --argjson sz "$(stat -c %s "$disk")" \
      --argjson ino "$(stat -c %i "$disk")" '
    .path == $p and .format_version == 1 and .clean == true and
    .image_size == $sz and .image_inode == $ino and .recovery_note == null and
    (.uuid | test("^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")) and
    (.bitmaps | length) == 1 and
    (.bitmaps[0] | .name == "cbt" and .flags == ["active"] and .active and
        (.frozen | not) and (.inconsistent | not) and .granularity == 65536 and
        .dirty_bytes == 7 * 65536 + 4096 and .data_checksum_ok and .trusted and
        .dirty_percent == 4.41)' "$tmp/info.json" >/dev/null ||
    { cat "$tmp/info.json"; die "cbt bitmap info --json: unexpected values"; }
cbt bitmap dump --json "$bm" | jq -e 'length == 6 and .[1] == {"offset": 983040, "length": 131072}' \
    >/dev/null || die "cbt bitmap dump --json: unexpected extents"
out=$(cbt bitmap dump "$bm" | tail -n 1)
has "# bitmap 'cbt': 6 extents, 462848 bytes dirty"
expect_rc 0 cbt bitmap check "$bm" --image "$disk"
[ "$out" = "$bm: ok" ] || die "check: expected '$bm: ok', got '$out'"
cbt bitmap check --json "$bm" | jq -e '.ok and .status == "ok" and .clean and .notes == []' \
    >/dev/null || die "cbt bitmap check --json: not ok"

# SIGTERM, restart: the same bits, still trusted, reported over NBD.
start_filterd --image "$disk" --bitmap "$bm" --tracking lazy
[ "$(dirty_map)" = "$expected" ] || die "dirty map changed across a clean restart"
qio -f raw "$uri" -c 'write -P 6 7M 512'
# ---- kill -9: not clean, then inconsistent --------------------------------
kill -KILL "$pid"
wait "$pid" 2>/dev/null || true
expect_rc 0 cbt bitmap info "$bm"
has "not clean: the daemon did not shut down cleanly (or is running); backups from this bitmap will be full"
has "trusted:         no"
expect_rc 0 cbt bitmap check "$bm" --image "$disk"
has "$bm: ok"
has "not clean"
cbt bitmap check --json "$bm" | jq -e '.ok and .clean == false and (.notes | length) >= 1' \
    >/dev/null || die "check --json after kill -9"
expect_rc 0 cbt bitmap dump "$bm"
has "$bm: not clean"
cbt bitmap info --json "$bm" | jq -e '.clean == false and (.bitmaps[0].trusted | not)' \
    >/dev/null || die "info --json after kill -9: expected not clean, untrusted"

# Restart after the crash: the entry is INCONSISTENT on disk at once, and
# the daemon reports every block dirty.
start_filterd --image "$disk" --bitmap "$bm" --tracking lazy
grep -q "not shut down cleanly" "$log" || die "daemon did not warn about the unclean bitmap"
cbt bitmap info --json "$bm" | jq -e '.clean == false and .bitmaps[0].inconsistent and
        (.bitmaps[0].flags | index("inconsistent")) != null' >/dev/null ||
    die "info --json after restart from kill -9: entry not inconsistent"
[ "$(dirty_map)" = "0 $(stat -c %s "$disk")" ] || die "untrusted bitmap not reported all dirty"
stop_filterd
# Clean again, but the entry stays inconsistent until a full backup.
cbt bitmap info --json "$bm" | jq -e '.clean and .bitmaps[0].inconsistent and
        (.bitmaps[0].trusted | not)' >/dev/null ||
    die "info --json after clean stop: expected clean, inconsistent, untrusted"
expect_rc 0 cbt bitmap check "$bm"
has "bitmap 'cbt' is inconsistent"
# The bits the killed daemon had written are still there (untrusted).
got=$(cbt bitmap dump -q "$bm")
grep -qx "983040 131072" <<<"$got" || die "dump after the crash lost bits: $got"

# ---- corrupt files --------------------------------------------------------
cp "$disk" "$tmp/disk.copy"
cbt bitmap create "$tmp/good.bm" --image "$disk"

# Missing: unreadable, exit 1.
expect_rc 1 cbt bitmap check "$tmp/missing.bm"
has "$tmp/missing.bm: cannot open"
cbt bitmap check --json "$tmp/missing.bm" >"$tmp/check.json" || true
jq -e '.status == "failed" and (.ok | not) and .clean == null' "$tmp/check.json" \
    >/dev/null || die "check --json on a missing file"
expect_rc 1 cbt bitmap info "$tmp/missing.bm"

# Not a bitmap at all.
expect_rc 4 cbt bitmap check "$disk"
has "$disk: not a cbt bitmap file"

# image_size changed in both header copies: no intact header.
cp "$tmp/good.bm" "$tmp/hdr.bm"
flip "$tmp/hdr.bm" 70
flip "$tmp/hdr.bm" $((4096 + 70))
expect_rc 4 cbt bitmap check "$tmp/hdr.bm"
has "$tmp/hdr.bm: no intact header"
cbt bitmap check --json "$tmp/hdr.bm" >"$tmp/check.json" && die "check --json exit 0 on damage"
jq -e '.status == "damaged" and (.reason | test("header"))' "$tmp/check.json" >/dev/null ||
    die "check --json on a damaged header"
refused "$tmp/hdr.bm" "no intact header"

# One header copy damaged: the other generation is used, the file is valid
# but not clean, and says why.
cp "$tmp/good.bm" "$tmp/hdr1.bm"
flip "$tmp/hdr1.bm" 70
expect_rc 0 cbt bitmap check "$tmp/hdr1.bm"
has "not clean"
has "newest metadata copy unusable"
cbt bitmap info --json "$tmp/hdr1.bm" | jq -e '.recovery_note != null and .clean == false' \
    >/dev/null || die "info --json: no recovery note"

# Bitmap data flipped in a clean file: checksum mismatch.
cp "$tmp/good.bm" "$tmp/data.bm"
flip "$tmp/data.bm" 24576
expect_rc 4 cbt bitmap check "$tmp/data.bm"
has "$tmp/data.bm: bitmap 'cbt': data checksum mismatch"
refused "$tmp/data.bm" "checksum"

# Truncated: the data area is cut off; then almost nothing is left.
cp "$tmp/good.bm" "$tmp/trunc.bm"
truncate -s 24576 "$tmp/trunc.bm"
expect_rc 4 cbt bitmap check "$tmp/trunc.bm"
has "$tmp/trunc.bm: "
refused "$tmp/trunc.bm" "$tmp/trunc.bm"
truncate -s 100 "$tmp/trunc.bm"
expect_rc 4 cbt bitmap check "$tmp/trunc.bm"
refused "$tmp/trunc.bm" "$tmp/trunc.bm"

# Garbage: random bytes of a few sizes, and the good file's header on
# random bytes; each is refused, never taken for a bitmap.
for size in 1 4096 24576 1048576; do
    head -c "$size" /dev/urandom >"$tmp/garbage.bm"
    expect_rc 4 cbt bitmap check "$tmp/garbage.bm"
    refused "$tmp/garbage.bm" "$tmp/garbage.bm"
done
head -c 4096 "$tmp/good.bm" >"$tmp/garbage.bm"
head -c 65536 /dev/urandom >>"$tmp/garbage.bm"
expect_rc 4 cbt bitmap check "$tmp/garbage.bm"
refused "$tmp/garbage.bm" "$tmp/garbage.bm"

# ---- a bitmap made for another image --------------------------------------
other=$tmp/other.img
truncate -s $(stat -c %s "$disk") "$other"
cbt bitmap create "$tmp/other.bm" --image "$other"
expect_rc 0 cbt bitmap check "$tmp/other.bm" --image "$other"
expect_rc 4 cbt bitmap check "$tmp/other.bm" --image "$disk"
has "$tmp/other.bm: does not belong to $disk: image file replaced"
refused "$tmp/other.bm" "does not belong"
# ... or for this image before it was resized.
truncate -s 1M "$other"
expect_rc 4 cbt bitmap check "$tmp/other.bm" --image "$other"
has "image size changed"
expect_rc 1 cbt bitmap check "$tmp/other.bm" --image "$tmp/missing.img"

# ---- create, then the daemon uses it --------------------------------------
new=$tmp/new.bm
expect_rc 0 cbt bitmap create "$new" --image "$disk" --granularity 4K --name nightly
expect_rc 1 cbt bitmap create "$new" --image "$disk"
has "$new: cannot create: File exists"
cbt bitmap info --json "$new" | jq -e '.clean and .bitmaps[0].name == "nightly" and
        .bitmaps[0].granularity == 4096 and .bitmaps[0].dirty_bytes == 0 and
        .bitmaps[0].trusted' >/dev/null || die "created bitmap: unexpected info"
expect_rc 1 cbt bitmap dump "$new"
has "no bitmap named 'cbt' (the file has 'nightly')"
start_filterd --image "$disk" --bitmap "$new" --tracking lazy --bitmap-name nightly
qio -f raw "$uri" -c 'write -P 7 5000 1' -c 'write -P 8 1M 8k'
stop_filterd
grep -q "created bitmap" "$log" && die "daemon created a bitmap instead of using $new"
dump_is "$new" "4096 4096
1048576 8192" --name nightly
cbt bitmap info --json "$new" | jq -e '.clean and .bitmaps[0].trusted and
        .bitmaps[0].dirty_bytes == 12288' >/dev/null || die "used bitmap: unexpected info"
expect_rc 0 cbt bitmap check "$new" --image "$disk"
[ "$out" = "$new: ok" ] || die "check after use: $out"

echo "$progname: PASS"
