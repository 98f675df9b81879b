#!/usr/bin/env bash
# Crafted qcow2 images (issue 12: what held up in the probe must stay).
#
# Header fields set to hostile values (cluster_bits 0/8/63, huge sizes,
# l1_size beyond any limit or too small for the disk, tables past the end
# of the file or unaligned, huge snapshot counts, header_length out of
# range, unknown incompatible bits, refcount_order out of range, a
# backing name past EOF or too long), and a backing chain that loops: the
# daemon refuses each with one line of error, in bounded time, without a
# crash or a sanitizer report, and leaves no socket behind.
#
# L2 entries that point where they must not (unaligned, on the header):
# the daemon starts, a read of the bad range fails with EIO, the rest of
# the disk reads back right, and the daemon stops cleanly.  An L2 entry
# past the end of the file reads as zeros, as in QEMU.

source "$(dirname "$0")/functions.sh"
requires qemu-img qemu-io
cd "$tmp"

# refused IMG: the daemon must exit non-zero with a one-line message.
refused()
{
    local img=$1 out status=0
    out=$(timeout 60 "$CBT_FILTERD" --image "$img" --format qcow2 \
          --socket "$tmp/s" 2>&1) || status=$?
    [ "$status" -ne 0 ] || die "$img: daemon started"
    [ "$status" -ne 124 ] || die "$img: daemon did not exit within 60 s"
    (( status < 128 )) || { echo "$out" >&2; die "$img: daemon killed by signal $((status - 128))"; }
    if grep -qE 'Sanitizer|runtime error|AddressSanitizer' <<<"$out"; then
        echo "$out" >&2
        die "$img: sanitizer report"
    fi
    [ "$(grep -c . <<<"$out")" = 1 ] || { echo "$out" >&2; die "$img: not one line of error"; }
    [ ! -e "$tmp/s" ] || die "$img: socket left behind"
    echo "refused $img: $out"
}

# poke IMG OFFSET SIZE VALUE: write a big-endian integer of SIZE bytes.
poke()
{
    "$PYTHON" - "$@" <<'PY'
import sys
path, off, size, val = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3]), int(sys.argv[4], 0)
with open(path, "r+b") as f:
    f.seek(off)
    f.write(val.to_bytes(size, "big"))
PY
}

# peek IMG OFFSET SIZE: read a big-endian integer.
peek()
{
    "$PYTHON" - "$@" <<'PY'
import sys
path, off, size = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3])
with open(path, "rb") as f:
    f.seek(off)
    print(int.from_bytes(f.read(size), "big"))
PY
}

qemu-img create -q -f qcow2 -o cluster_size=64k base.qcow2 8M
qemu-io -f qcow2 -c "write -P 0x11 0 1M" -c "write -P 0x22 4M 64k" base.qcow2 >/dev/null

# name OFFSET SIZE VALUE: a copy of base.qcow2 with one header field set.
n=0
crafted()
{
    n=$((n + 1))
    local img=h$n-$1.qcow2
    cp base.qcow2 "$img"
    poke "$img" "$2" "$3" "$4"
    refused "$img"
}
crafted cluster-bits-0        20 4 0
crafted cluster-bits-8        20 4 8
crafted cluster-bits-63       20 4 63
crafted size-2e63             24 8 0x8000000000000000
crafted l1-size-huge          36 4 0xffffffff
crafted l1-size-too-small     36 4 0
crafted l1-offset-past-eof    40 8 0x10000000000
crafted l1-offset-unaligned   40 8 0x30200
crafted reftable-past-eof     48 8 0x10000000000
crafted reftable-unaligned    48 8 0x10100
crafted reftable-clusters-0   56 4 0
crafted reftable-clusters-max 56 4 0xffffffff
crafted snapshots-huge        60 4 0xffffffff
crafted incompatible-bit-40   72 8 0x10000000000
crafted refcount-order-10     96 4 10
crafted header-length-0       100 4 0
crafted header-length-huge    100 4 0x7fffffff
crafted backing-past-eof      8 8 0x10000000000
crafted version-1             4 4 1

# A backing name as long as the cluster and pointing into the header.
cp base.qcow2 h-backing-long.qcow2
poke h-backing-long.qcow2 8 8 0x70
poke h-backing-long.qcow2 16 4 65536
refused h-backing-long.qcow2

# A backing chain that comes back to itself.
qemu-img create -q -f qcow2 -b loop-b.qcow2 -F qcow2 -u loop-a.qcow2 8M
qemu-img create -q -f qcow2 -b loop-a.qcow2 -F qcow2 -u loop-b.qcow2 8M
refused loop-a.qcow2

# ---- bad table entries: served, the bad range fails, the rest reads ----
l1=$(peek base.qcow2 40 8)
l2=$(( $(peek base.qcow2 "$l1" 8) & 0x00fffffffffffe00 ))
[ "$l2" -gt 0 ] || die "base.qcow2 has no L2 table"

# served IMG BADOFF: start, read [BADOFF, +64k) -> error, 4M -> 0x22.
served()
{
    local img=$1 bad=$2
    start_filterd --image "$img" --format qcow2 --read-only
    local out
    out=$(qemu-io -r -f raw -c "read $bad 64k" "$uri" 2>&1) || true
    grep -q "read failed" <<<"$out" ||
        { echo "$out" >&2; die "$img: reading the range with a bad table entry did not fail"; }
    qio -r -f raw -c "read -P 0x22 4M 64k" "$uri"
    kill -0 "$pid" || die "$img: daemon died"
    stop_filterd
    echo "served $img: bad range fails, the rest reads"
}

# L2 entry 0 (guest 0..64k) past the end of the file: as in QEMU, what
# lies past the end of the file reads as zeros (a crash may leave an
# allocated cluster there, never written); nothing else changes.
cp base.qcow2 e-l2-past-eof.qcow2
poke e-l2-past-eof.qcow2 "$l2" 8 0x8000040000000000
start_filterd --image e-l2-past-eof.qcow2 --format qcow2 --read-only
qio -r -f raw -c "read -P 0 0 64k" -c "read -P 0x11 64k 64k" -c "read -P 0x22 4M 64k" "$uri"
stop_filterd

# L2 entry 0 unaligned.
cp base.qcow2 e-l2-unaligned.qcow2
poke e-l2-unaligned.qcow2 "$l2" 8 0x8000000000050200
served e-l2-unaligned.qcow2 0

# L2 entry 0 on the header cluster.
cp base.qcow2 e-l2-header.qcow2
poke e-l2-header.qcow2 "$l2" 8 0x8000000000000000
served e-l2-header.qcow2 0

echo "crafted qcow2: OK"
