#!/usr/bin/env bash
# cbt restore --instant checks the backup against the manifest's chunk
# checksums as it reads it, and stops with exit 4 at damage, before the
# damaged bytes reach the output.  A full backup of 160 MiB (a pattern
# byte per MiB) is three 64 MiB checksum chunks: chunk 0 holds the qcow2
# header, chunk 2 the tables, chunk 1 only guest data.  One byte of
# chunk 1 is flipped:
#   - the background copy reaches it: the daemon logs the file and the
#     chunk's byte range and exits 4 (no client involved); every granule
#     of the output is the backup's or not copied (zeros), none stored in
#     chunk 1 is copied, all before the first of those in guest order are
#     (tests/chunkmap.py finds where each one is: cbt backup stores them
#     in the order they arrive), and the state file is left (the restore
#     is not complete);
#   - with the copy slowed down (--rate 1M, so that it is far from the
#     damage), a client reads data stored in chunk 0 correctly, then a
#     read of the damaged range gets EIO and the daemon exits 4; the
#     output as above, but for the prefix;
#   - a flipped byte in chunk 0 (the header's) is refused at once (exit 4)
#     and no output is created.
# Skips (77) only when FUSE is unavailable (the backup is read through a
# private FUSE mount that checks it).

source "$(dirname "$0")/functions.sh"
requires qemu-img jq
requires_python_nbd
[ -c /dev/fuse ] || skip "/dev/fuse is missing: no FUSE in this kernel or container"
[ "$(id -u)" -eq 0 ] || requires fusermount3
export CBT_FILTERD             # cbt restore --instant runs it

size=$((160 << 20))
disk=$tmp/disk.img
repo=$tmp/repo
csock=$tmp/ctl.sock
"$PYTHON" - "$disk" "$size" <<'PY'
import sys
with open(sys.argv[1], "wb") as f:
    for i in range(int(sys.argv[2]) >> 20):
        f.write(bytes([0x10 + i % 0xe0]) * (1 << 20))
PY
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

isock=$tmp/instant.sock
ictl=$tmp/instant-ctl.sock
# start OUT ARGS...: cbt restore --instant of the damaged repository into
# OUT in the background.  Sets $ipid and $ilog.
n=0
start()
{
    local o=$1
    shift
    n=$((n + 1))
    ilog=$tmp/instant-$n.log
    rm -f "$tmp/instant.pid"
    "$CBT_CLI" restore --instant --repo "$bad" --output "$o" --socket "$isock" \
        --control "$ictl" --pid-file "$tmp/instant.pid" "$@" >"$ilog" 2>&1 &
    ipid=$!
    _daemon_log[$ipid]=$ilog
    cleanup_fn _kill_daemon "$ipid"
}
# wait_exit: once $ipid exits by itself, its exit status in $status;
# fails if the restore completes instead (a hang guard of 300 s, not a
# timing check).
wait_exit()
{
    local i s
    status=0
    for (( i = 0; i < 3000; i++ )); do
        if ! kill -0 "$ipid" 2>/dev/null; then
            wait "$ipid" || status=$?
            return 0
        fi
        s=$(ctl "$ictl" '{"execute":"status"}' 2>/dev/null | jq -c '.return.restore') || s=
        if [ -n "$s" ] && json_true '.complete' "$s"; then
            cat "$ilog" >&2
            die "the restore of a damaged backup completed: $s"
        fi
        sleep 0.1
    done
    die "cbt restore --instant still running after 300 s"
}
# check_output OUT PREFIX: every 64 KiB granule of OUT is the backup's or
# still zeros (not copied); none stored in chunk 1 was copied; with
# PREFIX=prefix, every granule before the 1 MiB copy job holding the
# first granule stored in chunk 1 was (the copier goes in order and
# finishes the jobs it started); the state file is left (not complete).
check_output()
{
    "$PYTHON" - "$1" "$disk" "$bad/$full" "$2" <<'PY' || die "$1: see above"
import sys
import chunkmap
out, disk, qcow2, prefix = sys.argv[1:5]
g = 65536
m = chunkmap.Map(qcow2)
first_bad = min(o for o, c in m.clusters(160 << 20, g) if c == 1)
must = first_bad // (1 << 20) * (1 << 20) if prefix == "prefix" else 0
zero = bytes(g)
with open(out, "rb") as o, open(disk, "rb") as d:
    off = 0
    while True:
        a, b = o.read(g), d.read(g)
        if not b:
            break
        if a == zero:
            if off < must:
                sys.exit(f"{out}: granule at {off}, before the damage at {first_bad}, "
                         "was not copied")
        elif a != b:
            sys.exit(f"{out}: granule at {off} is neither zeros nor the backup's")
        elif m.chunk_of(off) == 1:
            sys.exit(f"{out}: granule at {off}, stored in the damaged chunk, was copied")
        off += g
PY
    [ -e "$1.restore-state" ] || die "$1.restore-state is gone"
}

# The background copy finds the damage.
start "$tmp/out1.raw"
wait_exit
[ "$status" -eq 4 ] || { cat "$ilog" >&2; die "exit status $status, expected 4"; }
grep -qF "$range" "$ilog" || { cat "$ilog" >&2; die "no log line '$range'"; }
check_output "$tmp/out1.raw" prefix

# A client reads it first, the copy slowed down so that it is far from it.
start "$tmp/out2.raw" --rate 1M
for (( i = 0; i < 600; i++ )); do
    [ -s "$tmp/instant.pid" ] && [ -S "$isock" ] && break
    kill -0 "$ipid" 2>/dev/null || { cat "$ilog" >&2; die "cbt restore --instant exited"; }
    sleep 0.1
done
[ -S "$isock" ] || die "cbt restore --instant: not serving after 60 s"
"$PYTHON" - "nbd+unix:///?socket=$isock" "$disk" "$bad/$full" "$guest" <<'PY' ||
import errno, sys
import chunkmap, nbd
uri, disk, qcow2 = sys.argv[1:4]
guest = int(sys.argv[4])
good = next(o for o, c in chunkmap.Map(qcow2).clusters(160 << 20, 65536) if c == 0)
h = nbd.NBD()
h.connect_uri(uri)
with open(disk, "rb") as d:
    d.seek(good)
    if h.pread(65536, good) != d.read(65536):
        sys.exit(f"the read at guest {good} (chunk 0) differs from the disk")
try:
    h.pread(4096, guest // 4096 * 4096)
    sys.exit(f"the read of the damaged range at guest {guest} returned data")
except nbd.Error as e:
    if e.errnum != errno.EIO:
        sys.exit(f"the read of the damaged range: {e}, expected EIO")
PY
    die "NBD reads (see above)"
wait_exit
[ "$status" -eq 4 ] || { cat "$ilog" >&2; die "exit status $status, expected 4"; }
grep -qF "$range" "$ilog" || { cat "$ilog" >&2; die "no log line '$range'"; }
check_output "$tmp/out2.raw" -

# Damage in the header's chunk: refused before anything is created.
bad0=$tmp/bad0
cp -a "$repo" "$bad0"
flip_byte "$bad0/$full" $((32 << 20))
expect_rc 4 timeout 60 "$CBT_CLI" restore --instant --repo "$bad0" \
    --output "$tmp/out0.raw" --socket "$tmp/x.sock"
has "$bad0/$full: checksum mismatch in bytes 0..67108863 (chunk 0)"
[ ! -e "$tmp/out0.raw" ] || die "a refused instant restore created its output"

echo ok
