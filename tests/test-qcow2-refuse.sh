#!/usr/bin/env bash
# qcow2 images the daemon does not support make it refuse to start, with a
# message naming the feature, before it listens: encryption (LUKS),
# external data file, extended L2 entries, refcount widths other than 16,
# non-zlib compression, unknown incompatible feature bits, the dirty bit,
# the corrupt bit when writable, a corrupt header, internal snapshots when
# writable, and --cache=none.  The same images still work where they
# should (snapshots and corrupt images read-only).

source "$(dirname "$0")/functions.sh"
requires qemu-img
cd "$tmp"

# refused IMG WORDS [ARGS...]: the daemon must exit non-zero mentioning WORDS.
refused()
{
    local img=$1 want=$2 out status=0
    shift 2
    out=$(timeout 30 "$CBT_FILTERD" --image "$img" --socket "$tmp/s" "$@" 2>&1) ||
        status=$?
    [ "$status" -ne 0 ] || die "$img: daemon started (expected refusal: $want)"
    [ "$status" -ne 124 ] || die "$img: daemon did not exit (expected refusal: $want)"
    grep -qiF -- "$want" <<<"$out" || { echo "$out" >&2; die "$img: message lacks '$want'"; }
    [ ! -e "$tmp/s" ] || die "$img: socket left behind"
    echo "refused $img: $(tail -n1 <<<"$out")"
}

# set_bits IMG OFFSET VALUE: OR a big-endian 64-bit VALUE into the header.
set_bits()
{
    "$PYTHON" - "$@" <<'PY'
import struct, sys
path, off, val = sys.argv[1], int(sys.argv[2]), int(sys.argv[3], 0)
with open(path, "r+b") as f:
    f.seek(off); cur, = struct.unpack(">Q", f.read(8))
    f.seek(off); f.write(struct.pack(">Q", cur | val))
PY
}

# qemu-img times its PBKDF to pick an iteration count and gives up with
# "Unable to get accurate CPU usage" on a busy machine: try a few times.
for try in 1 2 3 4 5; do
    rm -f luks.qcow2
    qemu-img create -q -f qcow2 --object secret,id=sec0,data=topsecret \
        -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 \
        luks.qcow2 1M 2>"$tmp/luks.err" && break
    sleep 0.2
done
[ -s luks.qcow2 ] || die "qemu-img could not create a LUKS image: $(cat "$tmp/luks.err")"
refused luks.qcow2 "encryption"

qemu-img create -q -f qcow2 -o data_file=ext.data ext.qcow2 1M
refused ext.qcow2 "external data file"

qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k l2x.qcow2 1M
refused l2x.qcow2 "extended L2"

qemu-img create -q -f qcow2 -o refcount_bits=8 rc8.qcow2 1M
refused rc8.qcow2 "refcount width 8"
qemu-img create -q -f qcow2 -o refcount_bits=64 rc64.qcow2 1M
refused rc64.qcow2 "refcount width 64"

if qemu-img create -q -f qcow2 -o compression_type=zstd zstd.qcow2 1M 2>/dev/null; then
    refused zstd.qcow2 "compression type"
fi

for bit in 5 40; do
    qemu-img create -q -f qcow2 unk$bit.qcow2 1M
    set_bits unk$bit.qcow2 72 $((1 << bit))
    refused unk$bit.qcow2 "unknown incompatible feature bit $bit"
done

qemu-img create -q -f qcow2 -o lazy_refcounts=on dirty.qcow2 1M
set_bits dirty.qcow2 72 1
refused dirty.qcow2 "dirty"
refused dirty.qcow2 "dirty" --read-only

qemu-img create -q -f qcow2 corrupt.qcow2 1M
set_bits corrupt.qcow2 72 2
refused corrupt.qcow2 "corrupt"
# Like QEMU, a corrupt image can still be read, to rescue its data.
start_filterd --image corrupt.qcow2 --read-only
stop_filterd

# A corrupt header: L1 table offset not cluster aligned.
qemu-img create -q -f qcow2 badl1.qcow2 1M
set_bits badl1.qcow2 40 0x200
refused badl1.qcow2 "l1_table_offset"

# Version 4 does not exist.
qemu-img create -q -f qcow2 v4.qcow2 1M
printf '\x00\x00\x00\x04' | dd of=v4.qcow2 bs=1 seek=4 conv=notrunc status=none
refused v4.qcow2 "version 4"

qemu-img create -q -f qcow2 snap.qcow2 1M
qemu-img snapshot -c s1 snap.qcow2
refused snap.qcow2 "snapshot"
start_filterd --image snap.qcow2 --read-only
stop_filterd

qemu-img create -q -f qcow2 ok.qcow2 1M
refused ok.qcow2 "cache=none" --cache none
refused missing.qcow2 "No such file"

# A backing file that is missing is named.
qemu-img create -q -f qcow2 -b gone.raw -F raw -u orphan.qcow2 1M
refused orphan.qcow2 "gone.raw"
