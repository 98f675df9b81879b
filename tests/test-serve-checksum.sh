#!/usr/bin/env bash
# cbt serve checks what it serves against the manifest's chunk checksums,
# as cbt restore does.  A full backup of 160 MiB of random data is three
# 64 MiB checksum chunks: chunk 0 holds the qcow2 header, chunk 2 the
# tables, chunk 1 only guest data.  One byte of chunk 1 is flipped:
#   - cbt serve comes up; an NBD read of a guest range stored in chunk 1
#     gets an EIO error reply (twice; the connection stays usable) and the
#     log names the file and the chunk's byte range; every data cluster
#     stored in chunks 0 and 2 reads as the disk's bytes (tests/chunkmap.py
#     finds where each one is); SIGTERM still stops it with status 0 and
#     the repository lock is free after;
#   - a flipped byte in chunk 0 (the header's chunk) refuses cbt serve
#     with exit 4, naming the file and range, before any socket exists.
# Skips (77) only when FUSE is unavailable (a point is served through a
# private FUSE mount that checks it).

source "$(dirname "$0")/functions.sh"
requires qemu-img jq flock
requires_python_nbd
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

bad=$tmp/bad
cp -a "$repo" "$bad"
host=$(( (64 << 20) + 12345 ))
guest=$("$PYTHON" -c 'import chunkmap, sys; print(chunkmap.Map(sys.argv[1]).guest_of(int(sys.argv[2])))' \
            "$bad/$full" "$host")
flip_byte "$bad/$full" "$host"
range="$bad/$full: checksum mismatch in bytes 67108864..134217727 (chunk 1)"

ssock=$tmp/serve.sock
"$CBT_CLI" serve --repo "$bad" --socket "$ssock" --pid-file "$tmp/serve.pid" \
    >"$tmp/serve.log" 2>&1 &
spid=$!
_daemon_log[$spid]=$tmp/serve.log
cleanup_fn _kill_daemon "$spid"
for (( i = 0; i < 600; i++ )); do
    [ -s "$tmp/serve.pid" ] && [ -S "$ssock" ] && break
    kill -0 "$spid" 2>/dev/null || { cat "$tmp/serve.log" >&2; die "cbt serve exited"; }
    sleep 0.1
done
[ -S "$ssock" ] || die "cbt serve: no socket after 60 s"
suri="nbd+unix:///?socket=$ssock"

# On one connection: the damaged range (EIO), every 64 KiB data cluster
# stored in chunk 0 or 2 (the disk's bytes), the damaged range again.
"$PYTHON" - "$suri" "$disk" "$bad/$full" "$guest" "$size" <<'PY' || die "NBD reads (see above)"
import errno, sys
import chunkmap, nbd
uri, disk, qcow2 = sys.argv[1:4]
guest, size = map(int, sys.argv[4:6])
h = nbd.NBD()
h.connect_uri(uri)

def bad(attempt):
    try:
        h.pread(4096, guest // 4096 * 4096)
        sys.exit(f"NBD read {attempt} of the damaged range at guest {guest} returned data")
    except nbd.Error as e:
        if e.errnum != errno.EIO:
            sys.exit(f"NBD read {attempt} of the damaged range: {e}, expected EIO")

bad(1)
good = [(g, c) for g, c in chunkmap.Map(qcow2).clusters(size, 65536) if c != 1]
if {c for g, c in good} != {0, 2}:
    sys.exit(f"expected data in chunks 0 and 2, found {sorted({c for g, c in good})}")
with open(disk, "rb") as d:
    for g, c in good:
        d.seek(g)
        if h.pread(65536, g) != d.read(65536):
            sys.exit(f"guest cluster at {g} (chunk {c}) differs from the disk")
bad(2)
h.shutdown()
PY
grep -qF "$range" "$tmp/serve.log" || { cat "$tmp/serve.log" >&2; die "no log line '$range'"; }
stop_filterd "$spid"
flock -n -x "$bad/.lock" true || die "the repository is still locked after serving"

# A byte in chunk 0 (the header's): refused before serving.
bad0=$tmp/bad0
cp -a "$repo" "$bad0"
flip_byte "$bad0/$full" $((32 << 20))
expect_rc 4 timeout 60 "$CBT_CLI" serve --repo "$bad0" --socket "$tmp/x.sock"
has "$bad0/$full: checksum mismatch in bytes 0..67108863 (chunk 0)"
[ ! -e "$tmp/x.sock" ] || die "a refused cbt serve created its socket"

echo ok
