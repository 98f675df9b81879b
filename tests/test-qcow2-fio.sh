#!/usr/bin/env bash
# fio through NBD on qcow2 images: two jobs (two connections), random
# writes of mixed sizes with flushes, crc32c verify through NBD; then the
# image, converted to raw by qemu-img, verifies again, and `qemu-img check`
# is clean; then overwrites at queue depth 1, verified.  Small cluster v3,
# 64K v2, 2M clusters over a raw backing file.

source "$(dirname "$0")/functions.sh"
requires fio qemu-img
fio --enghelp=nbd >/dev/null 2>&1 || skip "fio has no nbd engine"
cd "$tmp"

cat >job.fio <<'JOB'
[global]
rw=randwrite
bsrange=512-64k
blockalign=512
iodepth=16
size=6M
offset_increment=8M
numjobs=2
fsync=16
verify=crc32c
verify_fatal=1
verify_state_save=0
do_verify=1
[w]
JOB

truncate -s 16M base.raw
make_pattern_file base.raw $((16 * 1024 * 1024)) 0x77

for spec in "512 1.1" "65536 0.10" "2097152 1.1 base.raw"; do
    set -- $spec
    img=fio-$1-$2.qcow2
    qemu-img create -q -f qcow2 -o cluster_size=$1,compat=$2 ${3:+-b $3 -F raw} $img 16M
    start_filterd --image $img
    fio --ioengine=nbd --uri="$uri" job.fio >fio.out 2>&1 ||
        { cat fio.out; die "$img: fio write+verify through NBD failed"; }
    stop_filterd
    qemu-img check $img >check.out 2>&1 || { cat check.out; die "$img: qemu-img check"; }
    qemu-img convert -O raw $img out.raw
    fio --ioengine=psync --filename=out.raw --verify_only job.fio >fio2.out 2>&1 ||
        { cat fio2.out; die "$img: verify of the converted image failed"; }
    if [ -n "${3:-}" ]; then
        # Outside the jobs' ranges the backing file shows through.
        cmp -n $((2 * 1024 * 1024)) -i $((14 * 1024 * 1024)) "$3" out.raw ||
            die "$img: backing file data lost"
    fi
    # Overwrites in place at queue depth 1: the fast path, where a write
    # alone on its connection has its reply linked to it (worker.c).
    start_filterd --image $img
    fio --ioengine=nbd --uri="$uri" --name=qd1 --rw=randwrite --bs=4k --iodepth=1 \
        --size=6M --verify=crc32c --verify_fatal=1 --verify_state_save=0 --do_verify=1 \
        >fio3.out 2>&1 || { cat fio3.out; die "$img: overwrite+verify at QD1 failed"; }
    stop_filterd
    qemu-img check $img >check.out 2>&1 || { cat check.out; die "$img: qemu-img check after QD1"; }
    echo "$img: ok"
done
