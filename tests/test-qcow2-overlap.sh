#!/usr/bin/env bash
# Guest writes never land on qcow2 metadata, whatever a corrupt image says.
#
# (a) The header cluster's refcount is zero (`qemu-img check`: "cluster 0
#     refcount=0 reference=1"): the allocator must not hand cluster 0 out
#     for guest data.  The write lands elsewhere, the header survives, the
#     file is still detected as qcow2 (--format auto) and holds the data.
# (b)-(d) An L2 entry points at the L1 table, the refcount table, or
#     another L2 table: the write fails with an I/O error (on the fast path,
#     with the L2 table cached, and on the metadata thread), the metadata
#     is byte for byte intact, every later write, zero and trim fails too,
#     reads go on, and the image is marked corrupt on disk (v3), so the
#     daemon (like QEMU) opens it again only read-only.  A v2 image, which
#     has no corrupt bit, refuses the same way until restarted.
# (e) Metadata structures that overlap each other (an L1 entry pointing at
#     the refcount table) make the daemon refuse the image read-write.

source "$(dirname "$0")/functions.sh"
requires qemu-img qemu-io nbdinfo
cd "$tmp"

size=$((16 * 1024 * 1024))
cs=4096                 # one L2 table maps 2 MiB: several tables in 16 MiB

# q2 IMG CMD ARGS...: inspect or damage a qcow2 file in place.
#   zero-refcount C      set the refcount of host cluster C to 0
#   point VOFF TARGET    make the L2 entry of guest offset VOFF point at
#                        TARGET: l1, reftable, or l2:VOFF2 (the L2 table
#                        mapping guest offset VOFF2)
#   l1-at TARGET         point the second L1 entry at TARGET (reftable)
#   offset TARGET        print the host offset of TARGET
q2()
{
    "$PYTHON" - "$@" <<'PY'
import struct, sys
path, cmd, args = sys.argv[1], sys.argv[2], sys.argv[3:]
f = open(path, "r+b")
def u64(off):
    f.seek(off); return struct.unpack(">Q", f.read(8))[0]
def put64(off, v):
    f.seek(off); f.write(struct.pack(">Q", v))
f.seek(20); cbits, = struct.unpack(">I", f.read(4)); cs = 1 << cbits
f.seek(40); l1, rt = struct.unpack(">QQ", f.read(16))
mask = 0x00fffffffffffe00
def l2_of(voff):
    return u64(l1 + 8 * (voff // (cs * cs // 8))) & mask
def l2e_at(voff):
    return l2_of(voff) + 8 * ((voff // cs) % (cs // 8))
def target(t):
    if t == "l1": return l1
    if t == "reftable": return rt
    if t.startswith("l2:"): return l2_of(int(t[3:]))
    sys.exit("bad target " + t)
if cmd == "zero-refcount":
    c = int(args[0]); per = cs // 2
    blk = u64(rt + 8 * (c // per))
    f.seek(blk + 2 * (c % per)); f.write(b"\0\0")
elif cmd == "point":
    put64(l2e_at(int(args[0])), target(args[1]) | (1 << 63))
elif cmd == "l1-at":
    put64(l1 + 8, target(args[0]) | (1 << 63))
elif cmd == "offset":
    print(target(args[0]))
PY
}

# cluster_sum IMG OFF: checksum of the cluster at host offset OFF.
cluster_sum()
{
    dd if="$1" bs=$cs skip=$(($2 / cs)) count=1 status=none | cksum
}

# header_sum IMG: checksum of the header cluster but for the incompatible
# feature bits (bytes 72-79), where a refused write leaves the corrupt bit.
header_sum()
{
    { dd if="$1" bs=72 count=1 status=none
      dd if="$1" bs=8 skip=10 count=$(((cs - 80) / 8)) status=none; } | cksum
}

# make_image NAME COMPAT: data in guest clusters 0-15 (0x11) and at 4M (0x22).
make_image()
{
    qemu-img create -q -f qcow2 -o cluster_size=$cs,compat=$2 "$1" $size
    qio -f qcow2 "$1" -c 'write -P 0x11 0 64k' -c 'write -P 0x22 4M 64k'
}

# ---- (a) header cluster with refcount 0 ------------------------------------
make_image hdr.qcow2 1.1
q2 hdr.qcow2 zero-refcount 0
qemu-img check hdr.qcow2 >check.out 2>&1 && die "(a): qemu-img check found no error"
grep -q "cluster 0 refcount=0 reference=1" check.out || { cat check.out; die "(a): wrong damage"; }
head_before=$(header_sum hdr.qcow2)

start_filterd --image hdr.qcow2 --format auto
# Unallocated guest clusters: the allocator picks host clusters for them,
# one (the first free one, by refcount: cluster 0) and then a run.
out=$(qemu-io -f raw "$uri" -c 'write -P 0x55 8M 4k' -c 'write -P 0x56 12M 256k' \
      -c 'flush' 2>&1) || true
wrote=0
if grep -q "wrote 4096/4096" <<<"$out" && grep -q "wrote 262144/262144" <<<"$out"; then
    wrote=1
fi
qio -f raw "$uri" -c 'read -P 0x11 0 64k' -c 'read -P 0x22 4M 64k'
stop_filterd

[ "$(header_sum hdr.qcow2)" = "$head_before" ] || die "(a): the header cluster was overwritten"
qemu-img info --output=json hdr.qcow2 | grep -q '"format": "qcow2"' ||
    die "(a): qemu-img no longer sees a qcow2 image"
start_filterd --image hdr.qcow2 --format auto --read-only
[ "$(nbdinfo --size "$uri")" = $size ] || die "(a): --format auto serves $(nbdinfo --size "$uri") bytes"
qio -r -f raw "$uri" -c 'read -P 0x11 0 64k' -c 'read -P 0x22 4M 64k'
if [ $wrote = 1 ]; then qio -r -f raw "$uri" -c 'read -P 0x55 8M 4k' -c 'read -P 0x56 12M 256k'; fi
stop_filterd
# The only error is still the one we made.
qemu-img check hdr.qcow2 >check.out 2>&1 || true
if grep ERROR check.out | grep -vq "cluster 0 refcount=0 reference=1"; then
    cat check.out
    die "(a): new errors in the image"
fi
echo "(a) header refcount 0: write $([ $wrote = 1 ] && echo "landed elsewhere" || echo refused), header intact"

# ---- (b)-(d) L2 entries pointing at metadata -------------------------------
# overlap_case NAME TARGET COMPAT FAST
overlap_case()
{
    local name=$1 target=$2 compat=$3 fast=$4 img=$1.qcow2 toff sum ro=
    make_image "$img" "$compat"
    q2 "$img" point 4096 "$target"
    toff=$(q2 "$img" offset "$target")
    sum=$(cluster_sum "$img" "$toff")

    start_filterd --image "$img" --format auto
    if [ "$fast" = 1 ]; then
        # Reading first caches the L2 table: the write takes the fast path.
        qio -f raw "$uri" -c 'read 4096 4096'
    fi
    qio_fails "Input/output error" -f raw "$uri" -c 'write -P 0x99 4096 4096'
    [ "$(cluster_sum "$img" "$toff")" = "$sum" ] ||
        die "$name: guest data landed on $target"
    grep -q "image marked corrupt.*$target\|image marked corrupt" "$log" ||
        die "$name: the daemon did not say why the image is corrupt"
    # The image is corrupt now: healthy clusters refuse writes as well.
    qio_fails "Input/output error" -f raw "$uri" -c 'write -P 0x98 1M 4096'
    qio_fails "Input/output error" -f raw "$uri" -c 'write -P 0x97 0 4096'
    qio_fails "Input/output error" -f raw "$uri" -c 'write -z 2M 64k'
    qio_fails "Input/output error" -f raw "$uri" -c 'discard 0 64k'
    # Reads go on.
    qio -f raw "$uri" -c 'read -P 0x11 0 4096' -c 'read -P 0x11 8192 56k' \
        -c 'read -P 0x22 4M 64k' -c 'read -P 0 1M 4096' -c 'flush'
    stop_filterd

    [ "$(cluster_sum "$img" "$toff")" = "$sum" ] || die "$name: $target changed"
    qemu-img info --output=json "$img" >info.json
    grep -q '"format": "qcow2"' info.json || die "$name: not qcow2 any more"
    if [ "$compat" = 1.1 ]; then
        grep -q '"corrupt": true' info.json || { cat info.json; die "$name: not marked corrupt"; }
        out=$(timeout 30 "$CBT_FILTERD" --image "$img" --socket "$tmp/s" 2>&1) &&
            die "$name: a corrupt image was opened read-write"
        grep -q "marked corrupt" <<<"$out" || { echo "$out"; die "$name: no reason given"; }
        start_filterd --image "$img" --read-only
        ro=-r
    else
        # v2 has no corrupt bit: a restart writes again, and refuses again.
        start_filterd --image "$img"
        qio -f raw "$uri" -c 'write -P 0x98 1M 4096' -c 'read -P 0x98 1M 4096'
        qio_fails "Input/output error" -f raw "$uri" -c 'write -P 0x99 4096 4096'
    fi
    qio $ro -f raw "$uri" -c 'read -P 0x11 0 4096' -c 'read -P 0x22 4M 64k'
    stop_filterd
    [ "$(cluster_sum "$img" "$toff")" = "$sum" ] || die "$name: $target changed"
    echo "$name: write onto $target refused, later writes refused, reads served"
}

overlap_case l1 l1 1.1 1
overlap_case reftable reftable 1.1 0
overlap_case l2 l2:4194304 1.1 1
overlap_case l2-slow l2:4194304 1.1 0
overlap_case l1-v2 l1 0.10 1

# ---- (e) metadata overlapping metadata -------------------------------------
make_image meta.qcow2 1.1
q2 meta.qcow2 l1-at reftable
out=$(timeout 30 "$CBT_FILTERD" --image meta.qcow2 --socket "$tmp/s" 2>&1) &&
    die "(e): image with overlapping metadata was opened read-write"
grep -q "L2 table of L1 entry 1 .* overlaps the refcount table" <<<"$out" ||
    { echo "$out"; die "(e): reason does not name the overlap"; }
start_filterd --image meta.qcow2 --read-only
qio -r -f raw "$uri" -c 'read -P 0x11 0 64k'
stop_filterd
echo "(e) L1 entry pointing at the refcount table: refused read-write"
