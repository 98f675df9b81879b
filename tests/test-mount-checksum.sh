#!/usr/bin/env bash
# cbt mount checks what it serves against the manifest's chunk checksums,
# as cbt restore does.  A full backup of 160 MiB of random data is three
# 64 MiB checksum chunks: chunk 0 holds the qcow2 header, chunk 2 the
# tables, chunk 1 only guest data.  One byte of chunk 1 is flipped:
#   - the mount comes up (chunk 1 holds no metadata), a read of a guest
#     range stored in chunk 1 fails with EIO, twice, and the log names the
#     file and the chunk's byte range; every data cluster stored in chunks
#     0 and 2 reads as the disk's bytes (cbt backup stores clusters in the
#     order they arrive: tests/chunkmap.py finds where each one is);
#   - each chunk is hashed once however often it is read: after reading
#     all that twice and the damaged range again, the mount's --verbose
#     summary counts 3 chunks checked, 1 damaged;
#   - a flipped byte in chunk 0 (the header's chunk: every read depends on
#     it) refuses the mount with exit 4, naming the file and range.
# Skips (77) only when FUSE is unavailable.

source "$(dirname "$0")/functions.sh"
requires qemu-img jq mountpoint "$PYTHON"
[ -c /dev/fuse ] || skip "/dev/fuse is missing: no FUSE in this kernel or container"
[ "$(id -u)" -eq 0 ] || requires fusermount3

size=$((160 << 20))
disk=$tmp/disk.img
repo=$tmp/repo
csock=$tmp/ctl.sock
head -c "$size" /dev/urandom >"$disk"
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --control "$csock"
cbt backup --socket "$sock" --control "$csock" --repo "$repo" --full >/dev/null \
    2>"$tmp/backup.err" || { cat "$tmp/backup.err" >&2; die "cbt backup failed"; }
stop_filterd
full=$(jq -r '.backups[0].file' "$repo/manifest.json")
nsums=$(jq '.backups[0] | .[.checksum] | length' "$repo/manifest.json")
[ "$nsums" -eq 3 ] || die "expected 3 checksum chunks, the manifest has $nsums"

_unmount_quietly()
{
    { fusermount3 -u "$1" || umount -l "$1"; } 2>/dev/null
    kill -KILL "$2" 2>/dev/null
    wait "$2" 2>/dev/null
    return 0
}

_unmount_only() { { fusermount3 -u "$1" || umount -l "$1"; } 2>/dev/null; return 0; }

# A byte in chunk 1, pure data.
bad=$tmp/bad
cp -a "$repo" "$bad"
host=$(( (64 << 20) + 12345 ))
guest=$("$PYTHON" -c 'import chunkmap, sys; print(chunkmap.Map(sys.argv[1]).guest_of(int(sys.argv[2])))' \
            "$bad/$full" "$host")
flip_byte "$bad/$full" "$host"
range="$bad/$full: checksum mismatch in bytes 67108864..134217727 (chunk 1)"

# reads WHAT: through the mount, WHAT is "bad" (the damaged range, 4 KiB
# twice: each must fail with EIO) or "good" (every 64 KiB data cluster
# stored in chunk 0 or 2: each must equal the disk's bytes).
reads()
{
    "$PYTHON" - "$1" "$mp/disk.raw" "$disk" "$bad/$full" "$guest" "$size" <<'PY'
import errno, os, sys
import chunkmap
what, mnt, disk, qcow2 = sys.argv[1:5]
guest, size = map(int, sys.argv[5:7])
fd = os.open(mnt, os.O_RDONLY)
if what == "bad":
    for attempt in (1, 2):
        try:
            os.pread(fd, 4096, guest // 4096 * 4096)
            sys.exit(f"read {attempt} of the damaged range at guest {guest} returned data")
        except OSError as e:
            if e.errno != errno.EIO:
                sys.exit(f"read {attempt} of the damaged range: {e}, expected EIO")
    sys.exit(0)
good = [(g, c) for g, c in chunkmap.Map(qcow2).clusters(size, 65536) if c != 1]
if {c for g, c in good} != {0, 2}:
    sys.exit(f"expected data in chunks 0 and 2, found {sorted({c for g, c in good})}")
with open(disk, "rb") as d:
    for g, c in good:
        d.seek(g)
        if os.pread(fd, 65536, g) != d.read(65536):
            sys.exit(f"guest cluster at {g} (chunk {c}) differs from the disk")
PY
}

mp=$tmp/mp
mkdir -p "$mp"
"$CBT_CLI" --verbose mount --repo "$bad" "$mp" 2>"$tmp/mount.log" &
mpid=$!
cleanup_fn _unmount_quietly "$mp" "$mpid"
for (( i = 0; i < 600; i++ )); do
    mountpoint -q "$mp" && [ -e "$mp/disk.raw" ] && break
    kill -0 "$mpid" 2>/dev/null || { cat "$tmp/mount.log" >&2; die "cbt mount exited"; }
    sleep 0.1
done
mountpoint -q "$mp" || die "not mounted after 60 s"

reads bad || die "the damaged range (see above)"
grep -qF "$range" "$tmp/mount.log" || { cat "$tmp/mount.log" >&2; die "no log line '$range'"; }
# Each chunk hashed once: what chunks 0 and 2 hold read twice (and right),
# the damaged range again.
reads good || die "the data in chunks 0 and 2 (see above)"
reads good || die "the data in chunks 0 and 2, again (see above)"
reads bad || die "the damaged range, again (see above)"
expect_rc 0 cbt umount "$mp"
status=0; wait "$mpid" || status=$?
[ "$status" -eq 0 ] || die "cbt mount exited $status"
grep -q "3 chunks checked, 1 damaged" "$tmp/mount.log" ||
    { cat "$tmp/mount.log" >&2; die "no '3 chunks checked, 1 damaged' summary"; }

# A byte in chunk 0 (the header's): the mount is refused.
bad0=$tmp/bad0
cp -a "$repo" "$bad0"
flip_byte "$bad0/$full" $((32 << 20))
mkdir -p "$tmp/mp0"
cleanup_fn _unmount_only "$tmp/mp0"
expect_rc 4 cbt mount --daemon --repo "$bad0" "$tmp/mp0"
has "$bad0/$full: checksum mismatch in bytes 0..67108863 (chunk 0)"
! mountpoint -q "$tmp/mp0" || die "mounted although the header's chunk is damaged"

echo ok
