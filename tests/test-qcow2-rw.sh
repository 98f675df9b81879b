#!/usr/bin/env bash
# qcow2 images behind the daemon: the same random qemu-io workload (writes
# at odd offsets and sizes, FUA, WRITE_ZEROES with and without unmap,
# cluster-aligned TRIM on v3, flushes, requests in flight) goes through NBD
# to a qcow2 image and directly to a raw reference.  Afterwards the image
# read through NBD, and the file itself after shutdown, equal the reference
# and `qemu-img check` finds nothing.
#
# Images: cluster sizes 512, 4K, 64K, 2M as v2 (compat=0.10) and v3; raw
# and qcow2 backing files (relative names); compressed (qemu-img convert
# -c); preallocation=metadata.  Then `nbdinfo --map` must show data, zero
# clusters and holes where they are.

source "$(dirname "$0")/functions.sh"
requires qemu-img qemu-io nbdinfo

size=$((16 * 1024 * 1024))
cd "$tmp"

# workload SEED DISCARD: qemu-io commands, one per line.
workload()
{
    "$PYTHON" - "$1" "$2" "$size" <<'PY'
import random, sys
rnd = random.Random(int(sys.argv[1])); discard = sys.argv[2] == "1"
size = int(sys.argv[3]); M = 1 << 20
def rng(maxlen):
    n = rnd.randint(1, maxlen)
    o = rnd.randrange(0, size - n)
    if rnd.random() < 0.4:             # cluster/page aligned now and then
        o -= o % 4096; n = max(4096, n - n % 4096)
    return o, n
for i in range(70):
    r = rnd.random()
    if r < 0.45:
        o, n = rng(300 * 1024)
        print(f"write -P {rnd.randint(1, 255)} {o} {n}")
    elif r < 0.55:
        o, n = rng(64 * 1024)
        print(f"aio_write -P {rnd.randint(1, 255)} {o} {n}")
    elif r < 0.62:
        o, n = rng(64 * 1024)
        print(f"write -f -P {rnd.randint(1, 255)} {o} {n}")
    elif r < 0.74:
        o, n = rng(3 * M)
        print(f"write -z {o} {n}")
    elif r < 0.84:
        o, n = rng(3 * M)
        print(f"write -z -u {o} {n}")
    elif r < 0.92 and discard:
        o = rnd.randrange(0, size // (2 * M)) * 2 * M
        print(f"discard {o} {2 * M * rnd.randint(1, 2) if o + 4 * M <= size else 2 * M}")
    else:
        print("aio_flush" if rnd.random() < 0.5 else "flush")
print("aio_flush")
PY
}

# Same initial data into the qcow2 image $1 and the raw reference $2.
seed_data()
{
    local c=(-c 'write -P 0x5a 1M 3M' -c 'write -P 0x5b 5000 70000'
             -c 'write -P 0x5c 15M 1M')
    qio -f qcow2 "$1" "${c[@]}"
    qio -f raw "$2" "${c[@]}"
}

# run_case NAME IMG REF DISCARD: the workload against both, then compare.
run_case()
{
    local name=$1 img=$2 ref=$3 discard=$4 ops=() line seed
    seed=$(cksum <<<"$name" | cut -d' ' -f1)
    while IFS= read -r line; do ops+=(-c "$line"); done < <(workload "$seed" "$discard")

    start_filterd --image "$img"
    qio -f raw "$uri" "${ops[@]}"
    qio -f raw "$ref" "${ops[@]}"
    qemu-img compare -f raw -F raw "$uri" "$ref" >/dev/null ||
        die "$name: image through NBD differs from the reference"
    stop_filterd
    qemu-img check -f qcow2 "$img" >check.out 2>&1 ||
        { cat check.out; die "$name: qemu-img check failed"; }
    qemu-img compare -f qcow2 -F raw "$img" "$ref" >/dev/null ||
        die "$name: image file differs from the reference after shutdown"
    echo "$name: ok"
}

for cs in 512 4096 65536 2097152; do
    for compat in 0.10 1.1; do
        name=c$cs-v$compat
        qemu-img create -q -f qcow2 -o cluster_size=$cs,compat=$compat $name.qcow2 $size
        truncate -s $size $name.ref
        seed_data $name.qcow2 $name.ref
        run_case $name $name.qcow2 $name.ref $([ $compat = 1.1 ] && echo 1 || echo 0)
    done
done

# Raw backing file, relative name, image opened from another directory.
mkdir sub
truncate -s $size sub/base.raw
qio -f raw sub/base.raw -c 'write -P 0x11 0 6M' -c 'write -P 0x12 9M 3M'
(cd sub && qemu-img create -q -f qcow2 -o cluster_size=65536 -b base.raw -F raw top.qcow2)
cp sub/base.raw rawb.ref
seed_data sub/top.qcow2 rawb.ref
run_case backing-raw "$tmp/sub/top.qcow2" rawb.ref 1

# qcow2 backing file with data and zero clusters, 4K clusters on top.
qemu-img create -q -f qcow2 -o cluster_size=65536 qbase.qcow2 $size
qio -f qcow2 qbase.qcow2 -c 'write -P 0x21 0 8M' -c 'write -z 2M 1M' -c 'write -P 0x22 12M 100k'
qemu-img create -q -f qcow2 -o cluster_size=4096 -b qbase.qcow2 -F qcow2 qtop.qcow2
qemu-img convert -O raw qbase.qcow2 qb.ref
seed_data qtop.qcow2 qb.ref
run_case backing-qcow2 qtop.qcow2 qb.ref 1

# Compressed clusters (also cached across reads of one cluster).
truncate -s $size comp.raw
qio -f raw comp.raw -c 'write -P 0x31 0 5M' -c 'write -P 0x32 8M 2M' -c 'write -P 0x33 100000 3000'
qemu-img convert -c -O qcow2 -o cluster_size=65536 comp.raw comp.qcow2
qemu-img check comp.qcow2 | grep -q 'compressed clusters' || die "convert -c made no compressed image"
start_filterd --image comp.qcow2 --read-only
qemu-img compare -f raw -F raw "$uri" comp.raw >/dev/null || die "compressed: read differs"
stop_filterd
run_case compressed comp.qcow2 comp.raw 1

# preallocation=metadata: every cluster allocated, file sparse.
qemu-img create -q -f qcow2 -o cluster_size=65536,preallocation=metadata pre.qcow2 $size
truncate -s $size pre.ref
seed_data pre.qcow2 pre.ref
run_case prealloc-metadata pre.qcow2 pre.ref 1

# base:allocation from the L2 mapping.
qemu-img create -q -f qcow2 -o cluster_size=4096 map.qcow2 4M
qio -f qcow2 map.qcow2 -c 'write -P 1 0 64k' -c 'write -z 1M 64k' -c 'write -P 2 2M 4k'
start_filterd --image map.qcow2 --read-only
nbdinfo --map "$uri" | awk '{print $1, $2, $3}' >map.out
stop_filterd
cat >map.want <<'W'
0 65536 0
65536 2031616 3
2097152 4096 0
2101248 2093056 3
W
diff -u map.want map.out || die "nbdinfo --map: wrong extents"

# With a backing file the unallocated parts show the backing file's map.
qemu-img create -q -f qcow2 -o cluster_size=4096 -b map.qcow2 -F qcow2 map2.qcow2
qio -f qcow2 map2.qcow2 -c 'write -P 3 1M 4k'
start_filterd --image map2.qcow2 --read-only
nbdinfo --map "$uri" | awk '{print $1, $2, $3}' >map2.out
stop_filterd
cat >map2.want <<'W'
0 65536 0
65536 983040 3
1048576 4096 0
1052672 1044480 3
2097152 4096 0
2101248 2093056 3
W
diff -u map2.want map2.out || die "nbdinfo --map over a backing file: wrong extents"
