#!/usr/bin/env bash
# qcow2 files written by lib/qcow2/qcow2-writer.c, checked by qemu-img.
#
# tests/qcow2-writer-tool applies one workload both to a new qcow2 file and
# to a raw reference; qemu-img must find the qcow2 consistent (check: no
# errors, no leaks) and reading exactly the reference (compare).  Covers
# every cluster size we accept, sizes that are not cluster multiples,
# concurrent writers, a 64 TiB virtual disk, and a backing chain of a full
# backup and two incrementals with relative backing names, where zero
# clusters hide backing data.

source "$(dirname "$0")/functions.sh"
requires qemu-img

tool=$CBT_BUILD_DIR/tests/qcow2-writer-tool
[ -x "$tool" ] || die "$tool not built"

# check_image FILE: qemu-img check must report a clean image.
check_image()
{
    local out
    out=$(qemu-img check "$1" 2>&1) || die "qemu-img check $1: $out"
    grep -q 'No errors were found on the image' <<<"$out" ||
        die "qemu-img check $1: $out"
    ! grep -qi 'leak' <<<"$out" || die "qemu-img check $1: $out"
}

# vsize IMAGE: virtual size in bytes as qemu sees it.
vsize()
{
    qemu-img info --output=json "$1" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p'
}

# same IMAGE REF: same virtual size, same contents (qemu-img compare).
same()
{
    [ "$(vsize "$1")" = "$(stat -c %s "$2")" ] ||
        die "$1: virtual size $(vsize "$1"), expected $(stat -c %s "$2")"
    qemu-img compare -f qcow2 -F raw "$1" "$2" >/dev/null ||
        die "$1 differs from $2: $(qemu-img compare -f qcow2 -F raw "$1" "$2" 2>&1)"
}

# Standalone images: cluster sizes, odd sizes, random and concurrent I/O.
K=1024
for cs in 512 4096 65536 2097152; do
    for size in $((cs * 40)) $((cs * 39 + (cs > 512 ? cs / 2 + 512 : 512))); do
        img=$tmp/s-$cs-$size.qcow2 ref=$tmp/s-$cs-$size.raw
        "$tool" -c "$cs" "$img" "$ref" "$size" \
            "w:0:$cs:1" "r:$cs:60" "p:$size:200" "z:$((cs * 2)):$((cs * 3))" \
            >/dev/null
        check_image "$img"
        same "$img" "$ref"
        qemu-img info "$img" | grep -q "cluster_size: $cs" || die "$img: cluster size"
        # Round trip through qemu-img convert too.
        qemu-img convert -f qcow2 -O raw "$img" "$tmp/conv.raw"
        cmp "$tmp/conv.raw" "$ref" || die "$img: convert differs"
        rm -f "$img" "$ref" "$tmp/conv.raw"
    done
done

# A virtual size that is not a sector multiple reads as the size rounded up
# (as qemu-img create does), the tail as zeros.
"$tool" -c 4096 "$tmp/odd.qcow2" "$tmp/odd.raw" 10000 "w:8192:1808:3" >/dev/null
check_image "$tmp/odd.qcow2"
truncate -s 10240 "$tmp/odd.raw"
same "$tmp/odd.qcow2" "$tmp/odd.raw"

# 64 TiB (more than a test file system holds as a raw file): qemu opens
# it, check passes, and each written piece reads back as the same workload
# written at offset 0 of a small image.
T64=$(( 64 << 40 ))
"$tool" "$tmp/big.qcow2" - $T64 \
    "w:0:1M:1" "w:$(( T64 - 65536 )):64K:2" "w:$(( 33 << 40 )):128K:3" \
    "0:$(( 40 << 40 )):64K" >/dev/null
check_image "$tmp/big.qcow2"
[ "$(vsize "$tmp/big.qcow2")" = $T64 ] || die "big: virtual size"
# window OFFSET LEN: image options reading LEN bytes of big.qcow2 at OFFSET
# (qemu-img dd cannot skip that far).
window()
{
    echo "driver=raw,offset=$1,size=$2,file.driver=qcow2,file.file.filename=$tmp/big.qcow2"
}
# piece SEED LEN OFFSET: bytes at OFFSET of big.qcow2 equal "w:0:LEN:SEED".
piece()
{
    "$tool" "$tmp/p.qcow2" "$tmp/p.raw" "$2" "w:0:$2:$1" >/dev/null
    qemu-img convert --image-opts "$(window "$3" "$2")" -O raw "$tmp/p.out"
    cmp "$tmp/p.out" "$tmp/p.raw" || die "big: data at $3 differs"
    rm -f "$tmp/p.qcow2" "$tmp/p.raw" "$tmp/p.out"
}
piece 1 1048576 0
piece 2 65536 $(( T64 - 65536 ))
piece 3 131072 $(( 33 << 40 ))
qemu-img convert --image-opts "$(window $(( (33 << 40) + 131072 )) 1048576)" \
    -O raw "$tmp/p.out"
cmp -n 1048576 "$tmp/p.out" /dev/zero || die "big: unwritten area not zero"
rm -f "$tmp/big.qcow2" "$tmp/p.out"

# Backing chain: full, then two incrementals naming the previous backup
# relatively (resolved against the overlay's directory).  Each reference
# starts as a copy of the previous one and gets the same changes.
mkdir "$tmp/chain"
cd "$tmp/chain"
size=$((64 * 1024 * K + 12 * K))
"$tool" full.qcow2 full.raw $size "w:0:8M:1" "w:16M:4M:2" "r:7:40" >/dev/null
cp full.raw inc1.raw
"$tool" -b full.qcow2 -F qcow2 inc1.qcow2 inc1.raw $size \
    "z:0:1M" "0:2M:128K" "w:3M:64K:4" "z:16M:64K" "r:8:40" >/dev/null
cp inc1.raw inc2.raw
"$tool" -b inc1.qcow2 -F qcow2 -c 4096 inc2.qcow2 inc2.raw $size \
    "w:0:4K:5" "z:4M:2M" "w:$((size - 12 * K)):$((12 * K)):6" "p:9:400" >/dev/null
cd - >/dev/null
for f in full inc1 inc2; do
    check_image "$tmp/chain/$f.qcow2"
    same "$tmp/chain/$f.qcow2" "$tmp/chain/$f.raw"
done

# The chain resolves from another working directory, and qemu sees the
# backing format we recorded.
info=$(qemu-img info --backing-chain "$tmp/chain/inc2.qcow2")
grep -q "backing file: inc1.qcow2" <<<"$info" || die "inc2 backing file: $info"
grep -q "backing file: full.qcow2" <<<"$info" || die "inc1 backing file: $info"
[ "$(grep -c 'backing file format: qcow2' <<<"$info")" = 2 ] ||
    die "backing formats: $info"
[ "$(grep -c '^image:' <<<"$info")" = 3 ] || die "chain length: $info"
qemu-img convert -O raw "$tmp/chain/inc2.qcow2" "$tmp/flat.raw"
cmp "$tmp/flat.raw" "$tmp/chain/inc2.raw" || die "chain: convert differs"

# A raw backing file works as well.
cp "$tmp/chain/inc2.raw" "$tmp/chain/over.raw"
"$tool" -b inc2.raw -F raw "$tmp/chain/over-raw.qcow2" "$tmp/chain/over.raw" $size \
    "z:8M:64K" "w:9M:64K:9" >/dev/null
check_image "$tmp/chain/over-raw.qcow2"
same "$tmp/chain/over-raw.qcow2" "$tmp/chain/over.raw"

echo "$progname: ok"
