#!/usr/bin/env bash
# --scratch-limit: when the guest overwrites more of what a running backup
# still needs than the limit allows, the backup fails (exit 1, the reason
# named, then its checkpoint aborted so no change is lost) and the guest
# does not notice: every write succeeds.  The next backup restores to the
# disk.
# Both for a full and an incremental backup.

source "$(dirname "$0")/functions.sh"
requires qemu-io nbdcopy jq cmp

size=$((512 * 1024 * 1024))
disk=$tmp/disk.img
bm=$tmp/disk.bitmap
csock=$tmp/ctl.sock
repo=$tmp/repo
truncate -s "$size" "$disk"
start_filterd --image "$disk" --bitmap "$bm" --control "$csock" --scratch-limit 4M
qio -f raw "$uri" -c "write -P 0x11 0 512M"

# backup_over_limit MODE BYTE: run `cbt backup MODE`, and while it is
# frozen after its checkpoint began, rewrite the whole disk with BYTE.
backup_over_limit()
{
    local bp rc v
    # One connection: at most 16 MiB are read ahead before the freeze.
    backup_frozen_at_checkpoint "$csock" "$tmp/b.out" \
        "$CBT_CLI" backup --socket "$sock" --control "$csock" --repo "$repo" "$1" \
        --connections 1
    overwrite_all "$uri" "$size" "$2"
    v=$(view_status "$csock")
    json_true '.failed != null and (.failed | test("scratch limit")) and
               ."scratch-peak" <= 4194304' "$v" ||
        die "$1: the view did not fail at the limit: $v"
    kill -CONT "$bp"
    rc=0; wait "$bp" || rc=$?
    out=$(cat "$tmp/b.out")
    [ $rc -eq 1 ] || { echo "$out" >&2; die "$1: exit $rc, expected 1"; }
    has "point-in-time view failed"
    has "scratch limit"
    has "aborted"
    # The cause first, then what was done about it.
    has_in_order "point-in-time view failed" "aborted: its changes merged back"
    # The checkpoint is gone, the view too, and the guest's writes landed.
    json_true '.return.checkpoint == null' "$(ctl "$csock" '{"execute":"status"}')" ||
        die "$1: the checkpoint was not aborted"
    [ "$(scratch_files_of "$pid")" -eq 0 ] || die "$1: scratch file still held"
    qio -f raw "$uri" -c "read -P $2 0 512M"
}

restore_is_disk()
{
    nbdcopy "$uri" "$tmp/now.raw"
    rm -f "$tmp/r.raw"
    cbt restore --repo "$repo" --output "$tmp/r.raw" >/dev/null 2>&1 || die "restore failed ($1)"
    cmp "$tmp/now.raw" "$tmp/r.raw" || die "restore differs from the disk ($1)"
}

backup_over_limit --full 0x22
[ ! -e "$repo/manifest.json" ] || [ "$(cbt list --repo "$repo" --json | jq .count)" -eq 0 ] ||
    die "a failed backup was listed"
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo"
has "full"
restore_is_disk "full after a failed full"

qio -f raw "$uri" -c "write -P 0x33 0 512M"
backup_over_limit --incremental 0x44
# The aborted checkpoint merged its bits back: the next backup is still
# incremental and holds both rounds of writes.
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --incremental
restore_is_disk "incremental after a failed incremental"
stop_filterd
echo "scratch limit: backups fail cleanly, guest writes go on"
