#!/usr/bin/env bash
# A full file system: writes that need new blocks fail with ENOSPC, the
# connection and the daemon keep working, a TRIM frees room and writes work
# again, and every acknowledged write is in the image.  Skipped where a
# tmpfs cannot be mounted (needs root).

source "$(dirname "$0")/functions.sh"
requires qemu-io mount umount

mnt=$tmp/mnt
mkdir -p "$mnt"
mount -t tmpfs -o size=8m tmpfs "$mnt" 2>/dev/null || skip "cannot mount a tmpfs here"
cleanup_fn umount -l "$mnt"

# Twice: qemu-io's default cache mode (writethrough) sends every write
# with FUA, replied the normal way; with -t writeback the writes come
# without FUA, alone on their connection, so the daemon links each reply
# to its write (worker.c) and the failed write's reply must be the error,
# not the success the link would have sent had the write worked.
disk=$mnt/disk.img
for cache in writethrough writeback; do
    rm -f "$disk" "$tmp/disk.bitmap"
    truncate -s 32M "$disk"
    start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap"

    qio -t "$cache" -f raw "$uri" -c 'write -P 1 0 1M'
    out=$(qemu-io -t "$cache" -f raw "$uri" -c 'write -P 2 4M 16M' 2>&1) &&
        die "$cache: a 16 MiB write into 7 MiB of free space succeeded: $out"
    grep -qi "no space left" <<<"$out" || die "$cache: expected ENOSPC, got: $out"
    # The same connection kind keeps working; the first write is intact.
    qio -t "$cache" -f raw "$uri" -c 'read -P 1 0 1M'
    # Free the partly written range and write again.
    qio -t "$cache" -f raw "$uri" -c 'discard 4M 16M' -c 'write -P 3 4M 4M' -c 'flush' \
        -c 'read -P 3 4M 4M'
    stop_filterd
    cmp -n 1048576 "$disk" <(head -c 1048576 /dev/zero | tr '\0' '\1') ||
        die "$cache: first write lost"
done

# The bitmap on the full file system: the daemon cannot write it out, so
# it must not claim it is clean, and says so.
rm -f "$tmp/disk.bitmap"
truncate -s 4M "$mnt/disk2.img"
start_filterd --image "$mnt/disk2.img" --bitmap "$mnt/disk2.bitmap"
fallocate -l "$(( $(stat -f -c '%a*%S' "$mnt") ))" "$mnt/filler" 2>/dev/null ||
    dd if=/dev/zero of="$mnt/filler" bs=64k 2>/dev/null || true
qio -f raw "$uri" -c 'discard 0 64k'
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
if [ $status -ne 0 ]; then
    grep -q "next backup will be full" "$log" ||
        die "bitmap write failed without saying what it means"
else
    # The file system still had room for the bitmap pages (they were
    # allocated when it was created): then it must be clean and right.
    "${CBT_CLI:-$CBT_BUILD_DIR/cbt/cbt}" bitmap check "$mnt/disk2.bitmap" >/dev/null ||
        die "bitmap damaged"
fi
