#!/usr/bin/env bash
# A backup leaves the page cache as it found it: the writer hands each
# window of the new file to writeback as the copy goes on and drops the
# windows that reached the disk (lib/qcow2/qcow2-writer.c), so a nightly backup
# of a large disk does not push the VMs' working set out of the host's
# memory.  A 512 MiB full (64 MiB windows) may leave at most two windows
# and the first 64 MiB checksum chunk (read back for the header) cached:
# under half of the file; written through the cache without the drop, all
# of it would be.  The restore must still equal the disk.

source "$(dirname "$0")/functions.sh"
requires fincore cmp

disk=$tmp/disk.img
repo=$tmp/repo
head -c $((512 * 1024 * 1024)) /dev/urandom >"$disk"
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --control "$tmp/ctl.sock"

cbt backup --full --quiet --socket "$sock" --control "$tmp/ctl.sock" --repo "$repo" ||
    die "full backup failed"
file=$(ls "$repo"/*-full-*.qcow2)
size=$(stat -c %s "$file")
cached=$(fincore --bytes --noheadings --output RES "$file" | tr -d ' ')
[[ $cached =~ ^[0-9]+$ ]] || die "fincore printed '$cached'"
echo "backup file: $size bytes, $cached in the page cache"
(( cached * 2 < size )) ||
    die "the backup left $cached of its $size bytes in the page cache"

stop_filterd
cbt restore --quiet --repo "$repo" --output "$tmp/out.raw" || die "restore failed"
cmp "$disk" "$tmp/out.raw" || die "restored image differs"
