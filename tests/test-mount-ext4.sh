#!/usr/bin/env bash
# cbt mount of a disk holding an ext4 file system, as someone getting one
# file back would use it.  The disk is an ext4 image made by mkfs.ext4 -d
# from a directory (point 1, a full backup); point 2 is a second ext4
# image of a changed directory (a file rewritten, one added, one removed),
# written into the running daemon only where the two images differ, then
# backed up incrementally.  For each point:
#   - MOUNTPOINT/disk.raw equals cbt restore of the point (cmp);
#   - mount -o loop,ro of it shows exactly the directory the point was
#     made from (diff -r); while the loop device holds the file, cbt
#     umount is refused (busy, exit 1) and the mount goes on serving.
# The loop part is skipped with a message where this machine gives no
# loop device or may not mount; the test skips (77) only without FUSE.

source "$(dirname "$0")/functions.sh"
requires mkfs.ext4 cmp diff mountpoint
requires_python_nbd
[ -c /dev/fuse ] || skip "/dev/fuse is missing: no FUSE in this kernel or container"
[ "$(id -u)" -eq 0 ] || requires fusermount3

repo=$tmp/repo
csock=$tmp/ctl.sock
size=$((64 * 1024 * 1024))

# Two directory trees; point 2 changes a few things of point 1.
mkdir -p "$tmp/d1/etc" "$tmp/d1/data"
head -c 3000000 /dev/urandom >"$tmp/d1/data/big.bin"
head -c 200000 /dev/urandom >"$tmp/d1/data/gone.bin"
echo "hostname=point1" >"$tmp/d1/etc/config"
seq 1 20000 >"$tmp/d1/etc/numbers"
cp -a "$tmp/d1" "$tmp/d2"
echo "hostname=point2" >"$tmp/d2/etc/config"
printf 'changed in the middle' |
    dd of="$tmp/d2/data/big.bin" bs=1 seek=1500000 conv=notrunc status=none
rm "$tmp/d2/data/gone.bin"
head -c 100000 /dev/urandom >"$tmp/d2/data/new.bin"
# Same UUID and hash seed, so the images differ only where the trees do
# (and in the metadata describing that).
for p in 1 2; do
    mkfs.ext4 -q -F -b 4096 -U 6b1f4f0e-3c55-4a43-9f0a-1c2d3e4f5a6b \
        -E hash_seed=0d4c2c8e-5d8b-4b1f-8e0a-7a6b5c4d3e2f -d "$tmp/d$p" \
        "$tmp/fs$p.img" 64M >/dev/null || die "mkfs.ext4 -d $tmp/d$p failed"
done

cp "$tmp/fs1.img" "$tmp/disk.img"
start_filterd --image "$tmp/disk.img" --bitmap "$tmp/disk.bitmap" --control "$csock"
backup()
{
    cbt backup --socket "$sock" --control "$csock" --repo "$repo" "$@" >/dev/null \
        2>"$tmp/backup.err" || { cat "$tmp/backup.err" >&2; die "cbt backup $*: failed"; }
}
backup --full
# The guest "changes files": only the 64 KiB pieces that differ are written.
changed=$("$PYTHON" - "$uri" "$tmp/fs1.img" "$tmp/fs2.img" <<'PY'
import sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
n = 0
with open(sys.argv[2], "rb") as a, open(sys.argv[3], "rb") as b:
    off = 0
    while True:
        x, y = a.read(65536), b.read(65536)
        if not y:
            break
        if x != y:
            h.pwrite(y, off)
            n += 1
        off += len(y)
h.flush()
h.shutdown()
print(n)
PY
)
[ "$changed" -gt 0 ] && [ "$changed" -lt 512 ] ||
    die "the two ext4 images differ in $changed of 1024 pieces: not an incremental change"
backup --incremental
cmp "$tmp/disk.img" "$tmp/fs2.img" || die "the disk is not the second image"

_unmount_quietly()
{
    { fusermount3 -u "$1" || umount -l "$1"; } 2>/dev/null
    kill -KILL "$2" 2>/dev/null
    wait "$2" 2>/dev/null
    return 0
}
_umount_loop() { umount "$1" 2>/dev/null; return 0; }

# loop_gone FILE: wait (bounded, 60 s) until no loop device uses FILE;
# a loop device's autoclear may finish after umount returns.
loop_gone()
{
    local i
    for (( i = 0; i < 600; i++ )); do
        [ -z "$(losetup -j "$1" 2>/dev/null)" ] && return 0
        sleep 0.1
    done
    die "a loop device still uses $1 60 s after umount: $(losetup -j "$1")"
}

loop_checked=0
for p in 1 2; do
    mp=$tmp/m$p lm=$tmp/l$p
    mkdir -p "$mp" "$lm"
    "$CBT_CLI" mount --repo "$repo" --at "$p" "$mp" 2>"$tmp/mount-$p.log" &
    mpid=$!
    cleanup_fn _unmount_quietly "$mp" "$mpid"
    for (( i = 0; i < 600; i++ )); do
        mountpoint -q "$mp" && [ -e "$mp/disk.raw" ] && break
        kill -0 "$mpid" 2>/dev/null || { cat "$tmp/mount-$p.log" >&2; die "cbt mount exited"; }
        sleep 0.1
    done
    [ -e "$mp/disk.raw" ] || die "cbt mount --at $p: not mounted after 60 s"
    [ "$(stat -c %s "$mp/disk.raw")" -eq "$size" ] || die "point $p: wrong size"
    cbt restore --repo "$repo" --at "$p" --output "$tmp/r$p.raw" 2>/dev/null ||
        die "restore --at $p failed"
    cmp "$mp/disk.raw" "$tmp/r$p.raw" || die "point $p: mounted file differs from cbt restore"
    cmp "$mp/disk.raw" "$tmp/fs$p.img" || die "point $p: mounted file differs from the image"

    if out=$(mount -o loop,ro "$mp/disk.raw" "$lm" 2>&1); then
        cleanup_fn _umount_loop "$lm"
        diff -r -x lost+found "$tmp/d$p" "$lm" || die "point $p: loop-mounted tree differs"
        expect_rc 1 cbt umount "$mp"
        has "cannot unmount"
        mountpoint -q "$mp" || die "point $p: a refused cbt umount unmounted"
        cmp "$lm/etc/config" "$tmp/d$p/etc/config" || die "point $p: mount stopped serving"
        umount "$lm" || die "umount $lm failed"
        loop_gone "$mp/disk.raw"
        loop_checked=$((loop_checked + 1))
    else
        echo "$progname: mount -o loop,ro not possible here ($out): loop part skipped" >&2
    fi
    expect_rc 0 cbt umount "$mp"
    status=0; wait "$mpid" || status=$?
    [ "$status" -eq 0 ] || die "cbt mount --at $p exited $status"
    ! mountpoint -q "$mp" || die "$mp still mounted"
done

stop_filterd
echo "ok (loop-mounted $loop_checked of 2 points)"
