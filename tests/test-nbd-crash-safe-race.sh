#!/usr/bin/env bash
# Crash-safe tracking: a write is acknowledged only once its bit is on
# disk, even when another connection set that bit first and has not yet
# marked its page for write-out (issue 22, item 3).
#
# Connection A writes 4 KiB into granule G; its marker is stalled between
# setting G's bit and marking the page (CBT_FI_MARK_STALL, build option
# fault_injection).  Connection B, on the other worker thread, then
# writes another 4 KiB of G: it finds the bit already set, so its commit
# must still write and sync the page itself.  B's write is acknowledged,
# the daemon is killed (-9) while A is still stalled, restarted, and the
# next incremental backup must hold B's write: the restore equals the disk.

source "$(dirname "$0")/functions.sh"
requires cmp jq
requires_python_nbd
requires_fault_injection

disk=$tmp/disk.img
bm=$tmp/disk.bitmap
repo=$tmp/repo
gran=65536
g=$((100 * gran))                   # granule G
head -c $((16 * 1024 * 1024)) /dev/urandom >"$disk"

daemon()
{
    csock=$(mktemp -u "$tmp/ctl.XXXXXX")
    start_filterd --image "$disk" --bitmap "$bm" --control "$csock" --threads 2 \
        --granularity $gran "$@"
}

# The stall is armed for the daemon's whole life; nothing sets G's bit
# before A's write (the full backup only reads).
FILTERD_PREFIX="env CBT_FI_MARK_STALL=$g:60000" daemon
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --full

# A: its write stalls in the marker (it never completes: the daemon dies).
nbd_expect "$uri" "write $g 4096 0xaa ok" >"$tmp/a.out" 2>&1 &
apid=$!
cleanup_fn _kill_quietly "$apid"
wait_for_word "$log" "bitmap mark of $g stalled" "$pid"

# B: the same granule, another worker thread (connections go round-robin).
# Acknowledged means its bit is durable.
nbd_expect "$uri" "write $((g + 8192)) 4096 0xbb ok" || die "B's write failed"
kill -0 "$pid" || die "the daemon died before the kill"
kill -KILL "$pid"
wait "$pid" 2>/dev/null || true
wait "$apid" 2>/dev/null || true

# The bitmap is trusted after the crash, and the incremental holds B.
daemon
st=$(ctl "$csock" '{"execute":"status"}')
json_true '.return.bitmap.trusted' "$st" || die "bitmap not trusted after the crash: $st"
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --incremental
cbt restore --repo "$repo" --output "$tmp/r.raw" >/dev/null 2>&1 || die "restore failed"
cmp "$disk" "$tmp/r.raw" ||
    die "B's acknowledged write is missing from the incremental: its bit was not durable"
echo ok
