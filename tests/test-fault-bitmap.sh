#!/usr/bin/env bash
# I/O errors writing the bitmap file (fault injection, lib/fault-inject.c):
# the bitmap is never silently behind the disk.
#   Crash-safe tracking (the default): a guest write whose bit cannot be
#   made durable (bitmap write EIO or ENOSPC, fdatasync ENOSPC) fails with
#   EIO and never reaches the image; the bits stay trusted, and after a
#   kill -9 the next incremental backup restores to the disk.  When every
#   bitmap write fails, shutdown leaves the file not clean (exit status 1),
#   which crash-safe tracking still trusts.
#   Lazy tracking: a FLUSH whose bitmap write-out fails fails; a write-out
#   that fails only once is made good by the next; one that fails at
#   shutdown leaves the file not clean: the daemon reports the bitmap
#   untrusted at the next start and `cbt backup --incremental` refuses
#   (exit 3) while `cbt backup` falls back to full.
#   A bitmap write that fails while a backup begins its checkpoint fails
#   that backup (exit 1) and nothing else: the next backup aborts the
#   checkpoint, even when its begin was cut short after freezing the bits.

source "$(dirname "$0")/functions.sh"
requires_fault_injection
requires jq cmp
requires_python_nbd

disk=$tmp/disk.img
bm=$tmp/disk.bitmap
repo=$tmp/repo
K=65536
M=1048576
make_pattern_file "$disk" $((64 * M)) 0x5a

# daemon [RULES [ARGS...]]: start the daemon on $disk and $bm with a fresh
# control socket, CBT_FI_FAIL=RULES (none if empty).
daemon()
{
    local rules=${1:-}
    shift || true
    csock=$(mktemp -u "$tmp/ctl.XXXXXX")
    if [ -n "$rules" ]; then
        start_filterd_fi "$rules" --image "$disk" --bitmap "$bm" --control "$csock" "$@"
    else
        start_filterd --image "$disk" --bitmap "$bm" --control "$csock" "$@"
    fi
}
crash()
{
    kill -KILL "$pid"
    wait "$pid" 2>/dev/null || true
}
# stop_failing: SIGTERM the daemon; it must exit 1 saying that the bitmap
# stays not clean.
stop_failing()
{
    local rc=0
    kill -TERM "$pid"
    wait "$pid" || rc=$?
    [ "$rc" -eq 1 ] || { _show_log "$log"; die "daemon exited $rc after SIGTERM, expected 1"; }
    grep -q "could not write the bitmap out at shutdown" "$log" ||
        { _show_log "$log"; die "the daemon did not say that the bitmap stays not clean"; }
}
status_is()
{
    local st
    st=$(ctl "$csock" '{"execute":"status"}')
    json_true "$1" "$st" || die "$2: status: $st"
}
restore_is_disk()
{
    rm -f "$tmp/r.raw"
    cbt restore --repo "$repo" --output "$tmp/r.raw" >/dev/null 2>&1 || die "$1: restore failed"
    cmp "$disk" "$tmp/r.raw" || die "$1: the restore differs from the disk"
}
# incremental_after WHAT: restart cleanly; the bitmap must be trusted and
# an incremental backup restore to the disk.
incremental_after()
{
    daemon
    status_is '.return.bitmap.trusted' "$1"
    expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --incremental
    restore_is_disk "$1"
    stop_filterd
}

daemon
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --full
stop_filterd

# --- crash-safe: a commit that fails refuses the write -----------------------
# The first bitmap write of the run is the first guest write's commit.
daemon "bitmap:write:1:EIO"
nbd_expect "$uri" \
    "write 0 $K 0x11 EIO" \
    "read 0 $K 0x5a ok" \
    "write 0 $K 0x11 ok" \
    "write $M $K 0x22 ok"
injected "$log" "bitmap write 1: EIO"
status_is '.return.bitmap.trusted' "after a failed commit"
[ "$(dirty_map)" = "0 $K
$M $K" ] || die "dirty map after a failed commit: $(dirty_map)"
crash
incremental_after "kill -9 after a failed bitmap write"

daemon "bitmap:sync:1:ENOSPC"
nbd_expect "$uri" \
    "write $((2 * M)) $K 0x33 EIO" \
    "read $((2 * M)) $K 0x5a ok" \
    "write $((2 * M)) $K 0x33 ok"
injected "$log" "bitmap sync 1: ENOSPC"
crash
incremental_after "kill -9 after a failed bitmap fdatasync"

# Every bitmap write fails: no new granule can be written; shutdown
# cannot mark the file clean, and crash-safe tracking trusts it anyway.
daemon "bitmap:write:1+*:ENOSPC"
nbd_expect "$uri" \
    "write $((3 * M)) $K 0x44 EIO" \
    "write $((4 * M)) $K 0x44 EIO" \
    "read $((3 * M)) $K 0x5a ok"
injected "$log" "bitmap write 2: ENOSPC"
status_is '.return.bitmap.trusted' "while the bitmap cannot be written"
stop_failing
incremental_after "a shutdown that could not write the bitmap (crash-safe)"

# --- lazy: FLUSH fails with the write-out; a later write-out makes good -----
daemon "bitmap:write:1:EIO" --tracking lazy
nbd_expect "$uri" \
    "write $((5 * M)) $K 0x55 ok" \
    "flush 0 0 0 EIO" \
    "flush 0 0 0 ok"
injected "$log" "bitmap write 1: EIO"
stop_filterd
incremental_after "lazy: one failed write-out"

# The final write-out fails: the file is not clean, so it is untrusted.
daemon "bitmap:write:1+*:EIO" --tracking lazy
nbd_expect "$uri" \
    "write $((6 * M)) $K 0x66 ok" \
    "flush 0 0 0 EIO"
stop_failing
daemon
status_is '.return.bitmap.trusted == false and ."return".bitmap."clean-at-start" == false' \
    "lazy: after a shutdown that could not write the bitmap"
expect_rc 3 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --incremental
has "bitmap not clean"
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo"
has "taking a full backup"
has "full"
restore_is_disk "lazy: full backup after an untrusted bitmap"
stop_filterd

# --- a backup whose checkpoint cannot be recorded fails, nothing else -------
daemon "bitmap:write:1+*:EIO"
nbd_expect "$uri" "write $((7 * M)) $K 0x77 EIO"
expect_rc 1 cbt backup --socket "$sock" --control "$csock" --repo "$repo"
has "bitmap file"
status_is '.return.checkpoint == null' "after a failed checkpoint-begin"
stop_failing
incremental_after "a checkpoint-begin that could not write the bitmap"
# --- a checkpoint-begin that could not record its new interval --------------
# Begin froze the bits and cleared the active bitmap, then failed to write
# the active bitmap's new checkpoint id, so on disk it still has the old
# one (a kill -9 at that moment leaves the same).  The next backup must
# abort that checkpoint (merge the frozen bits back), not commit it
# because its id matches the newest backup: committing dropped every
# change frozen in it from the incremental.  On a fresh file and repository
# the failing write is the 10th of the run (CBT_FI_TRACE=1 numbers them);
# the daemon's message proves that it hit the right one.
disk=$tmp/disk2.img bm=$tmp/disk2.bitmap repo=$tmp/repo2
make_pattern_file "$disk" $((64 * M)) 0x5a
daemon
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --full
stop_filterd
daemon "bitmap:write:10:EIO"
nbd_expect "$uri" "write 0 $K 0x11 ok"
expect_rc 1 cbt backup --socket "$sock" --control "$csock" --repo "$repo"
has "cannot record the new interval"
grep -q "checkpoint begun but not fully recorded" "$log" ||
    { _show_log "$log"; die "the fault did not hit the write of the new interval"; }
# The checkpoint waits for the next backup, its view (nobody reads it) not.
status_is '.return.checkpoint != null and .return.checkpoint."point-in-time" == null' \
    "after a checkpoint-begin that could not record the new interval"
nbd_expect "$uri" "write $M $K 0x22 ok"
crash
daemon
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo"
restore_is_disk "a checkpoint-begin that could not record the new interval, then kill -9"
has "never fully recorded: aborting it"
stop_filterd
echo "bitmap I/O errors: writes refused or bitmap untrusted, never behind"
