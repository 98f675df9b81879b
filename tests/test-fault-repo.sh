#!/usr/bin/env bash
# I/O errors of the backup repository (fault injection in `cbt backup`,
# lib/fault-inject.c): a backup that cannot be stored fails (exit 1) with
# a message naming the file and the error, its checkpoint is aborted, and
# the repository is as it was: the same manifest bytes, no .partial or
# manifest temp file, `cbt verify` passes.  The next backup is still
# incremental and restores to the disk.  The failures:
#   - ENOSPC writing guest data into the backup file;
#   - EIO on the backup file's fdatasync when it is finished;
#   - EIO reading it back for the checksums;
#   - ENOSPC writing the manifest's temp file, EIO on its fsync.
# A failed fsync of the directory after the new manifest was renamed into
# place cannot undo the rename: the backup is listed and counts (exit 0,
# with a warning), and the repository stays consistent.

source "$(dirname "$0")/functions.sh"
requires_fault_injection
requires jq cmp
requires_python_nbd

size=$((64 * 1024 * 1024))
disk=$tmp/disk.img
bm=$tmp/disk.bitmap
repo=$tmp/repo
csock=$tmp/ctl.sock
head -c "$size" /dev/urandom >"$disk"
start_filterd --image "$disk" --bitmap "$bm" --control "$csock"
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --full

restore_is_disk()
{
    rm -f "$tmp/r.raw"
    cbt restore --repo "$repo" --output "$tmp/r.raw" >/dev/null 2>&1 || die "$1: restore failed"
    cmp "$disk" "$tmp/r.raw" || die "$1: the restore differs from the disk"
}
# no_leftovers WHAT: nothing but listed backups, the manifest and the lock.
no_leftovers()
{
    local f
    for f in "$repo"/* "$repo"/.[!.]*; do
        [ -e "$f" ] || continue
        case ${f##*/} in
            manifest.json | .lock) ;;
            *.qcow2) jq -e --arg f "${f##*/}" 'any(.backups[]; .file == $f)' \
                         "$repo/manifest.json" >/dev/null ||
                         die "$1: unlisted file ${f##*/} left in the repository" ;;
            *) die "$1: ${f##*/} left in the repository" ;;
        esac
    done
}

# failed_backup RULE WHAT TEXT...: guest writes, then `cbt backup` with
# CBT_FI_FAIL=RULE must fail cleanly, its output containing each TEXT; the
# next backup is incremental and restores to the disk.
failed_backup()
{
    local rule=$1 what=$2 t target op nth res
    shift 2
    IFS=: read -r target op nth res <<<"$rule"
    nbd_expect "$uri" "write $((RANDOM % 60 * 1048576)) 1048576 $((RANDOM % 255 + 1)) ok"
    cp "$repo/manifest.json" "$tmp/manifest.before"
    expect_rc 1 env CBT_FI_FAIL="$rule" "$CBT_CLI" backup --socket "$sock" \
        --control "$csock" --repo "$repo"
    has "cbt fault injection: $target $op ${nth%%+*}: $res"
    for t in "$@"; do has "$t"; done
    has "aborted"
    json_true '.return.checkpoint == null' "$(ctl "$csock" '{"execute":"status"}')" ||
        die "$what: the checkpoint was not aborted"
    cmp "$repo/manifest.json" "$tmp/manifest.before" ||
        die "$what: the manifest changed"
    no_leftovers "$what"
    expect_rc 0 cbt verify --repo "$repo"
    expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --incremental
    restore_is_disk "$what"
    no_leftovers "the backup after $what"
}

failed_backup "repo:write:1:ENOSPC" "ENOSPC writing the backup file" \
    "writing the backup file at guest offset" "No space left on device"
failed_backup "repo:sync:1:EIO" "EIO syncing the finished backup file" \
    ".qcow2.partial: fdatasync: Input/output error"
failed_backup "repo:read:1:EIO" "EIO reading the backup file for checksums" \
    ".qcow2.partial: reading at offset 0: Input/output error"
failed_backup "manifest:write:1:ENOSPC" "ENOSPC writing the manifest" \
    "manifest.json." "writing: No space left on device"
failed_backup "manifest:sync:1:EIO" "EIO syncing the manifest" \
    "manifest.json." "writing: Input/output error"

# The directory fsync after the rename fails: the backup is in place.
nbd_expect "$uri" "write 0 1048576 0x77 ok"
n=$(cbt list --repo "$repo" --json | jq .count)
expect_rc 0 env CBT_FI_FAIL="manifest:sync:2:EIO" "$CBT_CLI" backup --socket "$sock" \
    --control "$csock" --repo "$repo"
has "cbt fault injection: manifest sync 2: EIO"
has "may not survive a crash"
[ "$(cbt list --repo "$repo" --json | jq .count)" -eq $((n + 1)) ] ||
    die "the backup whose manifest was renamed into place is not listed"
json_true '.return.checkpoint == null' "$(ctl "$csock" '{"execute":"status"}')" ||
    die "the checkpoint of the listed backup was not committed"
no_leftovers "a failed directory fsync"
expect_rc 0 cbt verify --repo "$repo"
restore_is_disk "a failed directory fsync"
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --incremental
stop_filterd
echo "repository I/O errors: backups fail cleanly, the repository unchanged"
