#!/usr/bin/env bash
# I/O errors of the disk image (fault injection, lib/fault-inject.c): the
# client gets an NBD error reply with the right errno, the range the
# failed change covered is dirty in the bitmap (a failed write may have
# changed some of it), and the daemon goes on serving.  A short transfer
# is finished, never acknowledged half done.
#   1. EIO on a write, on a read (structured and simple replies);
#   2. ENOSPC on a write, a FUA write and a write-zeroes: NBD_ENOSPC;
#   3. short writes and reads (the rest resubmitted until complete);
#   4. qcow2: EIO and ENOSPC on a data write that allocates clusters
#      (metadata thread) and on an in-place write (worker ring); the
#      clusters of a failed allocation are free again (qemu-img check);
#      short transfers on both paths are completed;
#   5. EIO reading the disk for a running backup: the backup fails cleanly
#      and the daemon logs why.

source "$(dirname "$0")/functions.sh"
requires_fault_injection
requires nbdinfo qemu-img jq
requires_python_nbd

disk=$tmp/disk.img
bm=$tmp/disk.bitmap
K=65536
M=1048576

# dirty_is EXPECTED: the daemon's dirty map is EXPECTED ("offset length"
# lines), and so is the file's once the daemon stopped cleanly.
dirty_is()
{
    local got
    got=$(dirty_map)
    [ "$got" = "$1" ] || die "dirty map: expected
$1
got
$got"
}
dump_is()
{
    local got
    got=$(cbt bitmap dump -q "$bm")
    [ "$got" = "$1" ] || die "cbt bitmap dump $bm: expected
$1
got
$got"
}
fresh_raw()
{
    rm -f "$disk" "$bm"
    truncate -s 64M "$disk"
}

# --- 1. EIO on a write and on a read ---------------------------------------
fresh_raw
start_filterd_fi "image:write:2:EIO,image:read:1:EIO,image:read:4:EIO" \
    --image "$disk" --bitmap "$bm"
nbd_expect "$uri" \
    "write 0 $K 0x11 ok" \
    "write $M $K 0x22 EIO" \
    "read 0 $K 0x11 EIO" \
    "read 0 $K 0x11 ok" \
    "write $((2 * M)) $K 0x33 ok" \
    "read $((2 * M)) $K 0x33 ok"
NBD_EXPECT_NO_SR=1 nbd_expect "$uri" \
    "read 0 $K 0x11 EIO" \
    "read 0 $K 0x11 ok" \
    "write $M $K 0x44 ok" \
    "read $M $K 0x44 ok"
injected "$log" "image write 2: EIO"
injected "$log" "image read 4: EIO"
dirty_is "0 $K
$M $K
$((2 * M)) $K"
stop_filterd
dump_is "0 $K
$M $K
$((2 * M)) $K"

# The failed write's range is dirty even when nothing else wrote there.
fresh_raw
start_filterd_fi "image:write:1:EIO" --image "$disk" --bitmap "$bm"
nbd_expect "$uri" "write $((3 * M)) $K 0x55 EIO"
dirty_is "$((3 * M)) $K"
stop_filterd
dump_is "$((3 * M)) $K"

# --- 2. ENOSPC: the client sees ENOSPC, not EIO ------------------------------
fresh_raw
start_filterd_fi "image:write:1+3:ENOSPC" --image "$disk" --bitmap "$bm"
nbd_expect "$uri" \
    "write 0 $K 0x11 ENOSPC" \
    "write+fua $M $K 0x22 ENOSPC" \
    "zero $((2 * M)) $K 0 ENOSPC" \
    "write 0 $K 0x11 ok" \
    "read 0 $K 0x11 ok"
injected "$log" "image write 3: ENOSPC"
dirty_is "0 $K
$M $K
$((2 * M)) $K"
stop_filterd

# --- 3. short transfers are completed ---------------------------------------
# Each of the first writes (then reads) moves half of what it was asked
# to; the backend must submit the rest.  A write acknowledged after half
# leaves the old bytes in the image; a read, whatever its buffer held
# (reads run in a fresh daemon, so no buffer holds the data already).
fresh_raw
start_filterd_fi "image:write:1+4:short" --image "$disk" --bitmap "$bm"
nbd_expect "$uri" \
    "write 0 $M 0x66 ok" \
    "write+fua $((4 * M)) $K 0x77 ok"
stop_filterd
cmp -n $M "$disk" <(head -c $M /dev/zero | tr '\0' '\146') ||
    die "a short write was acknowledged before all of it reached the image"
cmp -i "$((4 * M)):0" -n $K "$disk" <(head -c $K /dev/zero | tr '\0' '\167') ||
    die "a short FUA write was acknowledged before all of it reached the image"
injected "$log" "image write 1: short, 524288 of 1048576 bytes"
injected "$log" "image write 4: short"
start_filterd_fi "image:read:1+4:short" --image "$disk" --bitmap "$bm"
nbd_expect "$uri" \
    "read 0 $M 0x66 ok" \
    "read $((4 * M)) $K 0x77 ok"
injected "$log" "image read 4: short"
stop_filterd

# --- 4. qcow2 ----------------------------------------------------------------
# Write 1 allocates a whole cluster (metadata thread, synchronous I/O);
# write 3 rewrites the cluster write 2 allocated (worker ring); write 5
# allocates for a partial cluster (copy-on-write of the rest).
qcow=$tmp/disk.qcow2
rm -f "$bm"
qemu-img create -q -f qcow2 "$qcow" 64M
start_filterd_fi "image:write:1:ENOSPC,image:write:3:EIO,image:write:5:EIO" \
    --image "$qcow" --bitmap "$bm"
nbd_expect "$uri" \
    "write 0 $K 0x11 ENOSPC" \
    "write 0 $K 0x22 ok" \
    "write 0 $K 0x33 EIO" \
    "write 0 $K 0x44 ok" \
    "read 0 $K 0x44 ok" \
    "write $((2 * M)) 4096 0x55 EIO" \
    "write $((2 * M)) 4096 0x55 ok" \
    "read $((2 * M)) 4096 0x55 ok" \
    "flush 0 0 0 ok"
injected "$log" "image write 1: ENOSPC"
injected "$log" "image write 3: EIO"
injected "$log" "image write 5: EIO"
dirty_is "0 $K
$((2 * M)) $K"
stop_filterd
# A failed allocating write leaves no cluster behind (exit 3: leaks).
out=$(qemu-img check "$qcow" 2>&1) || { echo "$out" >&2; die "qemu-img check $qcow"; }
start_filterd --image "$qcow" --bitmap "$bm"
nbd_expect "$uri" "read 0 $K 0x44 ok" "read $((2 * M)) 4096 0x55 ok"
stop_filterd

# Every qcow2 transfer short (halved until one byte is left): allocating
# writes (metadata thread), in-place writes and reads (worker ring).
start_filterd_fi "image:write:1+*:short" --image "$qcow" --bitmap "$bm"
nbd_expect "$uri" \
    "write $((4 * M)) $K 0x66 ok" \
    "write 0 $K 0x77 ok"
injected "$log" "image write 2: short"
stop_filterd
start_filterd_fi "image:read:1+*:short" --image "$qcow" --bitmap "$bm"
nbd_expect "$uri" \
    "read $((4 * M)) $K 0x66 ok" \
    "read 0 $K 0x77 ok"
injected "$log" "image read 2: short"
stop_filterd
out=$(qemu-img check "$qcow" 2>&1) || { echo "$out" >&2; die "qemu-img check $qcow"; }
# --- 5. a read error under a running backup ---------------------------------
# The backup fails naming the error, its checkpoint is aborted, the daemon
# says that the image failed; the next backup restores to the disk.  The
# disk holds 1 MiB of data, so the backup's one read is image read 1.
fresh_raw
csock=$tmp/ctl.sock
repo=$tmp/repo
start_filterd_fi "image:read:1:EIO" --image "$disk" --bitmap "$bm" --control "$csock"
nbd_expect "$uri" "write $M $M 0x12 ok"
expect_rc 1 cbt backup --socket "$sock" --control "$csock" --repo "$repo"
has "Input/output error"
has "aborted"
injected "$log" "image read 1: EIO"
grep -q "reading the image at offset $M length $M for the point-in-time view: Input/output error" \
    "$log" || { _show_log "$log"; die "the daemon did not log the image read error"; }
json_true '.return.checkpoint == null' "$(ctl "$csock" '{"execute":"status"}')" ||
    die "the checkpoint of the failed backup was not aborted"
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo"
rm -f "$tmp/r.raw"
cbt restore --repo "$repo" --output "$tmp/r.raw" >/dev/null 2>&1 || die "restore failed"
cmp "$disk" "$tmp/r.raw" || die "the backup after a failed one differs from the disk"
stop_filterd
echo "image I/O errors: error replies, dirty bits kept, short transfers finished"
