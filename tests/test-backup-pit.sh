#!/usr/bin/env bash
# Point-in-time backups of a disk the guest keeps writing (issue 9): a full
# and an incremental `cbt backup` are each frozen (SIGSTOP) right after
# their checkpoint began while a writer rewrites every granule of the disk
# with a new pattern (and zeroes and trims some of it); every guest write
# succeeds, the restore of each backup equals the disk as it was when its
# checkpoint began, and the next incremental holds the writes made during
# the previous backup.  Raw and qcow2 images.  Once a backup ended the
# daemon holds no scratch space.

source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img nbdcopy jq cmp

size=$((256 * 1024 * 1024))

run_format()
{
    local fmt=$1 disk=$tmp/disk.$1 repo=$tmp/repo-$1 bp rc v
    local csock=$tmp/ctl-$fmt.sock bm=$tmp/disk-$fmt.bitmap scratch=$tmp/scratch-$fmt

    mkdir -p "$scratch"
    if [ "$fmt" = qcow2 ]; then
        qemu-img create -q -f qcow2 "$disk" "$size"
    else
        truncate -s "$size" "$disk"
    fi
    start_filterd --image "$disk" --bitmap "$bm" --control "$csock" --scratch "$scratch"

    # The disk: data in the first 192 MiB, a hole at the end.
    qio -f raw "$uri" -c "write -P 0xaa 0 192M" -c "write -P 0x55 100M 3M"
    nbdcopy "$uri" "$tmp/at-begin-1.raw"

    # 1. Full backup, the guest rewrites everything meanwhile.
    backup_frozen_at_checkpoint "$csock" "$tmp/backup1.out" \
        "$CBT_CLI" backup --socket "$sock" --control "$csock" --repo "$repo" --full
    overwrite_all "$uri" "$size" 0xbb
    qio -f raw "$uri" -c "write -z 8M 8M" -c "discard 32M 8M" -c "write -z 250M 2M"
    v=$(view_status "$csock")
    json_true '.mode == "full" and ."copied-bytes" > 0 and .failed == null' "$v" ||
        die "$fmt: the view saved nothing while the guest wrote: $v"
    kill -CONT "$bp"
    rc=0; wait "$bp" || rc=$?
    [ $rc -eq 0 ] || { cat "$tmp/backup1.out" >&2; die "$fmt: full backup: exit $rc"; }
    grep -q "point in time" "$tmp/backup1.out" || die "$fmt: summary does not say point in time"
    # cbt backup released the whole view: what it stored and what it skipped.
    grep -q "bytes, $size bytes released by the reader" "$log" ||
        die "$fmt: the full backup did not release the whole view: $(grep 'view ended' "$log")"
    cbt restore --repo "$repo" --output "$tmp/r1.raw" >/dev/null 2>&1 || die "$fmt: restore 1"
    cmp "$tmp/at-begin-1.raw" "$tmp/r1.raw" ||
        die "$fmt: the full backup is not the disk as it was at checkpoint-begin"

    # Every guest write of step 1 landed.
    qio -f raw "$uri" -c "read -P 0xbb 0 8M" -c "read -P 0 8M 8M" \
        -c "read -P 0 32M 8M" -c "read -P 0xbb 40M 210M" -c "read -P 0 250M 2M"

    # 2. Incremental: the writes of step 1 are its changes; the guest
    #    rewrites everything again while it runs.
    nbdcopy "$uri" "$tmp/at-begin-2.raw"
    backup_frozen_at_checkpoint "$csock" "$tmp/backup2.out" \
        "$CBT_CLI" backup --socket "$sock" --control "$csock" --repo "$repo" --incremental
    overwrite_all "$uri" "$size" 0xcc
    v=$(view_status "$csock")
    json_true '.mode == "incremental" and ."copied-bytes" > 0' "$v" ||
        die "$fmt: incremental view saved nothing: $v"
    kill -CONT "$bp"
    rc=0; wait "$bp" || rc=$?
    [ $rc -eq 0 ] || { cat "$tmp/backup2.out" >&2; die "$fmt: incremental backup: exit $rc"; }
    grep -q "incremental" "$tmp/backup2.out" || die "$fmt: second backup was not incremental"
    cbt restore --repo "$repo" --output "$tmp/r2.raw" >/dev/null 2>&1 || die "$fmt: restore 2"
    cmp "$tmp/at-begin-2.raw" "$tmp/r2.raw" ||
        die "$fmt: the incremental is not the disk as it was at checkpoint-begin"

    # 3. A quiet incremental picks up what the guest wrote during 2.
    "$CBT_CLI" backup --socket "$sock" --control "$csock" --repo "$repo" --incremental \
        >/dev/null 2>&1 || die "$fmt: third backup failed"
    nbdcopy "$uri" "$tmp/now.raw"
    cbt restore --repo "$repo" --output "$tmp/r3.raw" >/dev/null 2>&1 || die "$fmt: restore 3"
    cmp "$tmp/now.raw" "$tmp/r3.raw" || die "$fmt: the writes made during backup 2 are missing"

    # No view, no scratch file once the backups ended.
    [ "$(view_status "$csock")" = null ] || die "$fmt: a view is still open"
    [ "$(scratch_files_of "$pid")" -eq 0 ] || die "$fmt: the daemon still holds a scratch file"
    [ -z "$(ls -A "$scratch")" ] || die "$fmt: files left in the scratch directory"
    stop_filterd
    rm -f "$tmp"/*.raw
}

run_format raw
run_format qcow2
echo "point-in-time full and incremental backups: raw and qcow2 OK"
