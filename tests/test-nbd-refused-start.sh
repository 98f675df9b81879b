#!/usr/bin/env bash
# Start-up refusals of cbt-filterd after the image (and, for some, the
# bitmap) was opened: each exits with status 1 and a message naming the
# file and the reason, leaves the image and the bitmap as they were, and
# releases everything it set up.  In the ASan build (run-suite.sh) a leak
# makes LeakSanitizer fail the daemon's exit (status 23, or 134 with
# abort_on_error=1), so "exactly 1 and no sanitizer report" is the leak
# check: refusing a bitmap used to leak the 56-byte lock of tracking_open.

source "$(dirname "$0")/functions.sh"
requires timeout cmp jq
[ -x "$CBT_CLI" ] || die "cbt CLI $CBT_CLI not found (build it: ninja -C build)"

disk=$tmp/disk.img
other=$tmp/other.img
bm=$tmp/disk.bm
truncate -s 16M "$disk"
truncate -s 16M "$other"
cbt bitmap create "$bm" --image "$disk" 2>/dev/null
cbt bitmap create "$tmp/other.bm" --image "$other" 2>/dev/null
cp "$disk" "$tmp/disk.copy"

# refused TEXT ARGS...: cbt-filterd --image $disk ARGS... must exit 1 at
# start-up, print TEXT, report nothing from a sanitizer, write no pid file
# and change neither the image nor (unless $bm_may_change) the bitmap.
bm_may_change=
refused()
{
    local text=$1 rc=0
    shift
    cp "$bm" "$tmp/bm.before"
    # -k: the daemon blocks SIGTERM while it starts (then 137, not 124).
    out=$(timeout -k 5 60 "$CBT_FILTERD" --image "$disk" --pid-file "$tmp/pid" "$@" \
              2>&1 </dev/null) || rc=$?
    [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || die "cbt-filterd $*: did not exit (timeout)"
    if [ "$rc" -ne 1 ] || grep -q Sanitizer <<<"$out"; then
        echo "$out" >&2
        die "cbt-filterd $*: exit $rc, expected 1 without a sanitizer report"
    fi
    has "$text"
    [ ! -e "$tmp/pid" ] || die "cbt-filterd $*: pid file written"
    cmp "$disk" "$tmp/disk.copy" || die "cbt-filterd $*: image changed"
    [ -n "$bm_may_change" ] || cmp "$bm" "$tmp/bm.before" ||
        die "cbt-filterd $*: bitmap changed"
}

# Refused when the bitmap is opened ...
refused "$tmp/other.bm: does not belong to $disk: image file replaced" \
    --socket "$tmp/s.sock" --bitmap "$tmp/other.bm"
refused "$tmp/other.bm: does not belong to $disk" \
    --socket "$tmp/s.sock" --bitmap "$tmp/other.bm" --read-only
cp "$bm" "$tmp/bad.bm"
printf 'XXXX' | dd of="$tmp/bad.bm" bs=1 seek=0 conv=notrunc status=none
printf 'XXXX' | dd of="$tmp/bad.bm" bs=1 seek=4096 conv=notrunc status=none
refused "$tmp/bad.bm: not a cbt bitmap file" --socket "$tmp/s.sock" --bitmap "$tmp/bad.bm"
# ... after it was opened ...
refused "has granularity 65536, not 4096" \
    --socket "$tmp/s.sock" --bitmap "$bm" --granularity 4K
refused "$bm: has no bitmap named 'nope'" \
    --socket "$tmp/s.sock" --bitmap "$bm" --bitmap-name nope --read-only
# ... and after it was set up, when the socket cannot be bound.
refused "$tmp/no-such-dir/s.sock" \
    --socket "$tmp/no-such-dir/s.sock" --bitmap "$bm" --read-only
# (A writer marked the bitmap in use, then clean again: new generations.)
bm_may_change=1
refused "no-such-dir" --socket "$tmp/no-such-dir/s.sock" --bitmap "$bm" \
    --control "$tmp/c.sock" --tracking lazy
# ... and with the workers running, when the pid file cannot be written.
refused "no-such-dir/pid" --socket "$tmp/s.sock" --bitmap "$bm" \
    --control "$tmp/c.sock" --pid-file "$tmp/no-such-dir/pid"
[ ! -e "$tmp/s.sock" ] && [ ! -e "$tmp/c.sock" ] || die "sockets left behind"
# Nothing was served: the bitmap is still clean and trusted.
cbt bitmap info --json "$bm" | jq -e '.clean and .bitmaps[0].trusted' >/dev/null ||
    die "$bm: not clean and trusted after the refusals"

# And it still serves.
start_filterd --image "$disk" --bitmap "$bm"
stop_filterd
echo ok
