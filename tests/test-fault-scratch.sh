#!/usr/bin/env bash
# I/O errors of the point-in-time view's scratch file (fault injection,
# lib/fault-inject.c), while a backup holds its view and the guest
# rewrites the whole disk:
#   1. EIO, then ENOSPC (every scratch write), writing the scratch file:
#      the view fails, every guest write succeeds, `cbt backup` exits 1
#      saying that the view failed and why, its checkpoint is aborted (the
#      next backup, incremental, still holds every change) and the scratch
#      file is gone;
#   2. EIO reading saved data back: the backup fails the same way;
#   3. short scratch writes and reads are completed: the backup is the
#      disk as it was when it began.
# The structure follows test-backup-pit-limit.sh (the scratch limit).

source "$(dirname "$0")/functions.sh"
requires_fault_injection
requires qemu-io nbdcopy jq cmp

size=$((256 * 1024 * 1024))
disk=$tmp/disk.img
bm=$tmp/disk.bitmap
repo=$tmp/repo
truncate -s "$size" "$disk"

daemon()
{
    csock=$(mktemp -u "$tmp/ctl.XXXXXX")
    start_filterd_fi "$1" --image "$disk" --bitmap "$bm" --control "$csock"
}

# backup_during_rewrite MODE BYTE: run `cbt backup MODE` and, while it is
# frozen after its checkpoint began, rewrite the whole disk with BYTE;
# then let it finish.  Its exit status is in $rc, its output in $out.
backup_during_rewrite()
{
    backup_frozen_at_checkpoint "$csock" "$tmp/b.out" \
        "$CBT_CLI" backup --socket "$sock" --control "$csock" --repo "$repo" "$1" \
        --connections 1
    overwrite_all "$uri" "$size" "$2"
    kill -CONT "$bp"
    rc=0; wait "$bp" || rc=$?
    out=$(cat "$tmp/b.out")
}

# backup_fails WHAT BYTE: after backup_during_rewrite the backup failed
# cleanly: exit 1, checkpoint aborted, no scratch file, the guest's writes
# all landed.
backup_fails()
{
    [ $rc -eq 1 ] || { echo "$out" >&2; die "$1: exit $rc, expected 1"; }
    has "aborted"
    json_true '.return.checkpoint == null' "$(ctl "$csock" '{"execute":"status"}')" ||
        die "$1: the checkpoint was not aborted"
    [ "$(scratch_files_of "$pid")" -eq 0 ] || die "$1: scratch file still held"
    qio -f raw "$uri" -c "read -P $2 0 $size"
}

restore_is()
{
    rm -f "$tmp/r.raw"
    cbt restore --repo "$repo" --output "$tmp/r.raw" >/dev/null 2>&1 || die "restore failed ($2)"
    cmp "$1" "$tmp/r.raw" || die "the restore differs ($2)"
}
restore_is_disk()
{
    nbdcopy "$uri" "$tmp/now.raw"
    restore_is "$tmp/now.raw" "$1"
}

# --- 1. writing the scratch file fails -------------------------------------
daemon "scratch:write:1:EIO"
qio -f raw "$uri" -c "write -P 0x11 0 $size"
backup_during_rewrite --full 0x22
injected "$log" "scratch write 1: EIO"
backup_fails "scratch write EIO" 0x22
has "point-in-time view failed"
has "writing the scratch file"
has "Input/output error"
[ ! -e "$repo/manifest.json" ] || [ "$(cbt list --repo "$repo" --json | jq .count)" -eq 0 ] ||
    die "a failed backup was listed"
# The fault was one write: the next view works.
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo"
has "full"
restore_is_disk "full after a scratch write EIO"
stop_filterd

daemon "scratch:write:1+*:ENOSPC"
qio -f raw "$uri" -c "write -P 0x33 0 $size"
backup_during_rewrite --incremental 0x44
injected "$log" "scratch write 1: ENOSPC"
backup_fails "scratch write ENOSPC" 0x44
has "point-in-time view failed"
has "No space left on device"
# The aborted checkpoint merged its bits back: still incremental, and it
# holds both rounds of writes (no guest write now, so no scratch write).
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --incremental
restore_is_disk "incremental after a scratch write ENOSPC"
stop_filterd

# --- 2. reading saved data back fails ----------------------------------------
daemon "scratch:read:1:EIO"
backup_during_rewrite --full 0x55
injected "$log" "scratch read 1: EIO"
backup_fails "scratch read EIO" 0x55
has "Input/output error"
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --incremental
restore_is_disk "incremental after a scratch read EIO"
stop_filterd

# --- 3. short scratch transfers ----------------------------------------------
daemon "scratch:write:1+8:short,scratch:read:1+8:short"
cp "$disk" "$tmp/before.raw"
backup_during_rewrite --full 0x66
[ $rc -eq 0 ] || { echo "$out" >&2; die "short scratch transfers: exit $rc"; }
injected "$log" "scratch write 8: short"
injected "$log" "scratch read 8: short"
restore_is "$tmp/before.raw" "the backup is the disk as it was when it began"
stop_filterd
echo "scratch file I/O errors: the backup fails cleanly, the guest goes on"
