#!/usr/bin/env bash
# Crash safety of qcow2 metadata: fio writes (allocating, with frequent
# flushes) through the daemon, which is killed with SIGKILL at a random
# moment, several times on the same image.  After every crash `qemu-img
# check` may report leaked clusters but never corruption, and data written
# and flushed before the crash reads back.  4K clusters v3 (many L2 and
# refcount updates) and 512-byte clusters v2 (refcount table growth).

source "$(dirname "$0")/functions.sh"
requires fio qemu-img qemu-io
fio --enghelp=nbd >/dev/null 2>&1 || skip "fio has no nbd engine"
cd "$tmp"

cat >job.fio <<'JOB'
[global]
rw=randwrite
bsrange=512-128k
blockalign=512
iodepth=16
offset=4M
size=28M
fsync=4
time_based=1
runtime=30
numjobs=2
[w]
JOB

for spec in "4096 1.1" "512 0.10"; do
    set -- $spec
    img=crash-$1.qcow2
    qemu-img create -q -f qcow2 -o cluster_size=$1,compat=$2 $img 32M
    for i in 0 1 2 3; do
        start_filterd --image $img
        # Acknowledged and flushed: must survive every later crash.
        qio -f raw "$uri" -c "write -P $((0x40 + i)) $((i * 512 * 1024)) 300k" -c flush
        fio --ioengine=nbd --uri="$uri" job.fio >fio.out 2>&1 &
        fiopid=$!
        sleep "$("$PYTHON" -c 'import random; print(round(random.uniform(0.3, 1.5), 2))')"
        kill -KILL "$pid"
        wait "$pid" 2>/dev/null || true
        wait "$fiopid" 2>/dev/null || true
        status=0
        qemu-img check $img >check.out 2>&1 || status=$?
        case $status in
            0|3) ;;                  # clean, or leaked clusters only
            *) cat check.out; die "$img: qemu-img check after crash $i: status $status" ;;
        esac
        grep -q "ERROR" check.out && { cat check.out; die "$img: corruption after crash $i"; }
        for (( j = 0; j <= i; j++ )); do
            qio -f qcow2 -r $img -c "read -P $((0x40 + j)) $((j * 512 * 1024)) 300k"
        done
        echo "$img: crash $i: $(grep -Eo '[0-9]+ leaked clusters' check.out || echo 'no leaks')"
    done
    # A clean run afterwards leaves a clean image (leaks from crashes stay
    # until qemu-img check -r leaks).
    qemu-img check -q -r leaks $img >/dev/null 2>&1 || true
    start_filterd --image $img
    qio -f raw "$uri" -c 'write -P 0x99 30M 1M' -c flush
    stop_filterd
    qemu-img check $img >check.out 2>&1 || { cat check.out; die "$img: not clean after a clean run"; }
done
