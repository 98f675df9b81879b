#!/usr/bin/env bash
# cbt mount / cbt umount on a repository of a full backup and two
# incrementals made through the real daemon (as test-backup-chain.sh
# makes them):
#   - the mounted MOUNTPOINT/disk.raw of a full and of an incremental point
#     equals cbt restore of the same point byte for byte (cmp), and the
#     image as it was when the backup was taken; both are mounted at once
#     (two shared locks);
#   - qemu-img info sees a raw file of the image size; qemu-img compare
#     against the restore and against the qcow2 chain itself passes;
#     qemu-img convert of the mounted file (it skips what SEEK_DATA /
#     SEEK_HOLE call holes, so a hole reported over data would lose it)
#     equals the restore, and qemu-img map reports a never-written range
#     as a hole and written data as data;
#   - the file is read-only (writes and new files are refused);
#   - while mounted the repository is locked: cbt backup is refused, and so
#     is the exclusive flock cbt-nightly's pruning takes;
#   - cbt umount unmounts, waits for the server (the lock is free when it
#     returns: a backup right after it succeeds), leaves the mountpoint
#     empty; SIGTERM to a foreground cbt mount unmounts and exits 0;
#     --daemon returns once mounted; after kill -9 of the server cbt
#     umount still clears the dead mount; a directory cbt did not mount is
#     refused;
#   - usage and refusals: no MOUNTPOINT (2), unknown backup (1), a chain
#     file replaced by a symbolic link (4, nothing mounted), /dev/fuse
#     missing (1, "FUSE is not available": checked in a private mount
#     namespace when unshare works).
# Skips (77) only when FUSE itself is unavailable here.

source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img jq cmp flock mountpoint
[ -c /dev/fuse ] || skip "/dev/fuse is missing: no FUSE in this kernel or container"
[ "$(id -u)" -eq 0 ] || requires fusermount3

disk=$tmp/disk.img
repo=$tmp/repo
csock=$tmp/ctl.sock
truncate -s 64M "$disk"
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --control "$csock"
dsock=$sock

io() { qio -f raw "$uri" "$@"; }
backup()
{
    cbt backup --socket "$dsock" --control "$csock" --repo "$repo" "$@" >/dev/null \
        2>"$tmp/backup.err" || { cat "$tmp/backup.err" >&2; die "cbt backup $*: failed"; }
}

# Point 1 (full): data, a hole from 16M to 48M, data straddling clusters.
io -c 'write -P 0x11 0 1M' -c 'write -P 0x22 8M 300k' -c 'write -P 0x33 63M 1M'
backup --full
cp --sparse=always "$disk" "$tmp/point1.raw"
# Point 2 (incremental): new data, zeroed and discarded ranges.
io -c 'write -P 0x44 4k 4k' -c 'write -z 8M 128k' -c 'discard 63M 64k' \
   -c 'write -P 0x55 40M 1M'
backup --incremental
cp --sparse=always "$disk" "$tmp/point2.raw"
# Point 3 (incremental), mounted with --daemon below.
io -c 'write -P 0x66 2M 64k'
backup --incremental
cp --sparse=always "$disk" "$tmp/point3.raw"
mapfile -t files < <(jq -r '.backups[].file' "$repo/manifest.json")
[ "${#files[@]}" -eq 3 ] || die "expected 3 backups, got ${#files[@]}"

# _unmount_quietly MP PID: cleanup of a mount the test did not end.
_unmount_quietly()
{
    { fusermount3 -u "$1" || umount -l "$1"; } 2>/dev/null
    kill -KILL "$2" 2>/dev/null
    wait "$2" 2>/dev/null
    return 0
}

# mount_at AT MP: cbt mount --at AT in the foreground of a background job;
# waits (a start-up guard, 60 s) until MP/disk.raw is there.  Sets $mpid.
mount_at()
{
    local at=$1 mp=$2 i
    mkdir -p "$mp"
    "$CBT_CLI" mount --repo "$repo" --at "$at" "$mp" 2>"$tmp/mount-$at.log" &
    mpid=$!
    cleanup_fn _unmount_quietly "$mp" "$mpid"
    for (( i = 0; i < 600; i++ )); do
        mountpoint -q "$mp" && [ -e "$mp/disk.raw" ] && return 0
        if ! kill -0 "$mpid" 2>/dev/null; then
            cat "$tmp/mount-$at.log" >&2
            die "cbt mount --at $at $mp exited before mounting"
        fi
        sleep 0.1
    done
    die "cbt mount --at $at $mp: not mounted after 60 s"
}

# PID has exited (a daemon's zombie, reparented, counts as exited).
exited()
{
    local st
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 0
    [ -z "$st" ] || [ "$st" = Z ] || [ "$st" = X ]
}

# Not mounted, and nothing left in the directory.
unmounted()
{
    ! mountpoint -q "$1" || die "$1 is still a mountpoint"
    ! grep -qF " $1 " /proc/self/mountinfo || die "$1 still in mountinfo"
    [ -z "$(ls -A "$1")" ] || die "$1 is not empty after unmounting: $(ls -A "$1")"
}

# The full point and an incremental one, mounted at the same time.
mount_at 1 "$tmp/m1"
m1pid=$mpid
mount_at 2 "$tmp/m2"
m2pid=$mpid
grep -q "mounted read-only at $tmp/m1/disk.raw" "$tmp/mount-1.log" ||
    die "no 'mounted' note: $(cat "$tmp/mount-1.log")"
for p in 1 2; do
    f=$tmp/m$p/disk.raw
    cbt restore --repo "$repo" --at "$p" --output "$tmp/r$p.raw" 2>/dev/null ||
        die "restore --at $p failed"
    [ "$(stat -c %s "$f")" -eq 67108864 ] || die "point $p: size $(stat -c %s "$f")"
    cmp "$f" "$tmp/r$p.raw" || die "point $p: mounted file differs from cbt restore"
    cmp "$f" "$tmp/point$p.raw" || die "point $p: mounted file differs from the image"
    info=$(qemu-img info --output=json -f raw "$f")
    json_true '.format == "raw" and ."virtual-size" == 67108864' "$info" ||
        die "point $p: qemu-img info: $info"
    qemu-img compare -q -f raw -F raw "$f" "$tmp/r$p.raw" ||
        die "point $p: qemu-img compare with the restore"
    qemu-img compare -q -f raw -F qcow2 "$f" "$repo/${files[p-1]}" ||
        die "point $p: qemu-img compare with the qcow2 chain"
    qemu-img convert -f raw -O raw "$f" "$tmp/c$p.raw" || die "point $p: qemu-img convert"
    cmp "$tmp/c$p.raw" "$tmp/r$p.raw" || die "point $p: qemu-img convert of it differs"
done
# SEEK_DATA/SEEK_HOLE: 16M..48M was never written (a hole at point 1);
# the first MiB is data.
map=$(qemu-img map --output=json -f raw "$tmp/m1/disk.raw")
json_true 'any(.[]; .start <= 16777216 and .start + .length >= 33554432 and
               .data == false and .zero == true)' "$map" ||
    die "16M..32M not reported as a hole: $map"
json_true 'any(.[]; .start == 0 and .length >= 1048576 and .data == true)' "$map" ||
    die "the first MiB not reported as data: $map"

# Read-only.
! (echo x >"$tmp/m2/disk.raw") 2>/dev/null || die "wrote to the mounted file"
! dd if=/dev/zero of="$tmp/m2/disk.raw" bs=4k count=1 conv=notrunc status=none 2>/dev/null ||
    die "dd wrote to the mounted file"
! touch "$tmp/m2/new" 2>/dev/null || die "created a file in the mount"
cmp "$tmp/m2/disk.raw" "$tmp/r2.raw" || die "the mounted file changed"

# The repository is locked while mounted.
expect_rc 1 cbt backup --socket "$dsock" --control "$csock" --repo "$repo"
has "is locked"
! flock -n -x "$repo/.lock" true || die "pruning's exclusive lock was granted while mounted"

# cbt umount: returns once the server is gone, mountpoint empty.
expect_rc 0 cbt umount "$tmp/m1"
exited "$m1pid" || die "cbt mount $m1pid still running after cbt umount"
status=0; wait "$m1pid" || status=$?
[ "$status" -eq 0 ] || die "cbt mount exited $status after cbt umount"
unmounted "$tmp/m1"
# SIGTERM to a foreground cbt mount unmounts.
kill -TERM "$m2pid"
status=0; wait "$m2pid" || status=$?
[ "$status" -eq 0 ] || die "cbt mount exited $status after SIGTERM, expected 0"
grep -q "unmounting (Terminated)" "$tmp/mount-2.log" || die "$(cat "$tmp/mount-2.log")"
unmounted "$tmp/m2"
# Nothing holds the repository any more.
flock -n -x "$repo/.lock" true || die "the repository is still locked after unmounting"

# --daemon: mounted when it returns.
mkdir -p "$tmp/m3"
expect_rc 0 cbt mount --daemon --repo "$repo" "$tmp/m3"
mountpoint -q "$tmp/m3" || die "--daemon returned before mounting"
dpid=$("$PYTHON" -c 'import os, sys; print(os.getxattr(sys.argv[1], "user.cbt.pid").decode())' "$tmp/m3")
cleanup_fn _unmount_quietly "$tmp/m3" "$dpid"
[ "$dpid" != "$$" ] && kill -0 "$dpid" || die "user.cbt.pid '$dpid' is not a live process"
cmp "$tmp/m3/disk.raw" "$tmp/point3.raw" || die "--daemon (latest): differs from point 3"
expect_rc 0 cbt umount "$tmp/m3"
exited "$dpid" || die "daemon $dpid still running after cbt umount"
unmounted "$tmp/m3"

# A backup right after the unmount finds the repository free.
io -c 'write -P 0x77 3M 64k'
backup --incremental

# kill -9 leaves a dead mount ("Transport endpoint is not connected"):
# cbt umount clears it.
mount_at 1 "$tmp/m4"
kill -KILL "$mpid"
wait "$mpid" 2>/dev/null || true
expect_rc 0 cbt umount "$tmp/m4"
has "is gone"
unmounted "$tmp/m4"

# Refusals.
mkdir -p "$tmp/plain"
expect_rc 1 cbt umount "$tmp/plain"
has "not mounted by cbt mount"
expect_rc 2 cbt mount --repo "$repo"
has "MOUNTPOINT is required"
expect_rc 1 cbt mount --repo "$repo" --at 99 "$tmp/plain"
has "no backup '99'"
expect_rc 1 cbt mount --repo "$repo" "$tmp/no-such-dir"
has "no-such-dir"
# A chain file replaced by a symbolic link (same bytes) is refused (4).
cp -a "$repo" "$tmp/repo-link"
cp "$tmp/repo-link/${files[0]}" "$tmp/full-copy.qcow2"
ln -sf "$tmp/full-copy.qcow2" "$tmp/repo-link/${files[0]}"
expect_rc 4 cbt mount --repo "$tmp/repo-link" --at 2 "$tmp/plain"
has "is a symbolic link"
unmounted "$tmp/plain"

# No /dev/fuse: a private mount namespace with a /dev without it.
if unshare -m --propagation private true 2>/dev/null; then
    rc=0
    out=$(unshare -m --propagation private bash -c '
        mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 &&
        exec "$0" mount --repo "$1" "$2"' "$CBT_CLI" "$repo" "$tmp/plain" 2>&1) || rc=$?
    [ "$rc" -eq 1 ] || { echo "$out" >&2; die "without /dev/fuse: exit $rc, expected 1"; }
    has "FUSE is not available: /dev/fuse"
else
    echo "$progname: unshare -m not permitted here: /dev/fuse-missing case not checked" >&2
fi

stop_filterd
echo ok
