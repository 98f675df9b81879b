#!/usr/bin/env bash
# Crashes during a point-in-time backup, while the view holds copies the
# guest overwrote:
#   - kill -9 of the daemon: no scratch data is left anywhere, the frozen
#     backup fails when it resumes, and the next backup -- still
#     incremental: crash-safe tracking kept the frozen and the active bits
#     -- restores to the disk;
#   - kill -9 of `cbt backup`: the view stays until the next backup aborts
#     the leftover checkpoint (its scratch space is freed then), and that
#     backup is still incremental and restores to the disk.

source "$(dirname "$0")/functions.sh"
requires qemu-io nbdcopy jq cmp

size=$((256 * 1024 * 1024))
disk=$tmp/disk.img
bm=$tmp/disk.bitmap
repo=$tmp/repo
scratch=$tmp/scratch
mkdir -p "$scratch"
truncate -s "$size" "$disk"

daemon()
{
    # A fresh control socket per start (see test-backup-crash.sh).
    csock=$(mktemp -u "$tmp/ctl.XXXXXX")
    start_filterd --image "$disk" --bitmap "$bm" --control "$csock" --scratch "$scratch"
}
restore_is_disk()
{
    nbdcopy "$uri" "$tmp/now.raw"
    rm -f "$tmp/r.raw"
    cbt restore --repo "$repo" --output "$tmp/r.raw" >/dev/null 2>&1 || die "restore failed ($1)"
    cmp "$tmp/now.raw" "$tmp/r.raw" || die "restore differs from the disk ($1)"
}
# frozen_backup: start an incremental backup and freeze it inside its
# checkpoint, then let the guest rewrite the disk; sets $bp.
frozen_backup()
{
    backup_frozen_at_checkpoint "$csock" "$tmp/b.out" \
        "$CBT_CLI" backup --socket "$sock" --control "$csock" --repo "$repo" --incremental \
        --connections 1
    overwrite_all "$uri" "$size" "$1"
    json_true '."scratch-bytes" > 0' "$(view_status "$csock")" ||
        die "the view holds no copies"
}

daemon
qio -f raw "$uri" -c "write -P 0x11 0 256M"
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo"
qio -f raw "$uri" -c "write -P 0x22 0 256M"

# 1. kill -9 of the daemon.
frozen_backup 0x33
kill -KILL "$pid"
wait "$pid" 2>/dev/null || true
[ -z "$(ls -A "$scratch")" ] || die "scratch data left after kill -9: $(ls -A "$scratch")"
daemon
kill -CONT "$bp"
rc=0; wait "$bp" || rc=$?
[ $rc -eq 1 ] || { cat "$tmp/b.out" >&2; die "backup across a daemon crash: exit $rc, expected 1"; }
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --incremental
has "aborting it"
restore_is_disk "after the daemon was killed"
[ "$(scratch_files_of "$pid")" -eq 0 ] || die "scratch file held after the backup"

# 2. kill -9 of the backup.
qio -f raw "$uri" -c "write -P 0x44 0 256M"
frozen_backup 0x55
kill -KILL "$bp"
wait "$bp" 2>/dev/null || true
[ "$(scratch_files_of "$pid")" -eq 1 ] || die "the view should still hold its scratch file"
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --incremental
has "aborting it"
restore_is_disk "after the backup was killed"
[ "$(view_status "$csock")" = null ] || die "a view is still open"
[ "$(scratch_files_of "$pid")" -eq 0 ] || die "scratch file held after the next backup"
[ -z "$(ls -A "$scratch")" ] || die "files left in the scratch directory"
stop_filterd
echo "crashes during point-in-time backups: OK"
