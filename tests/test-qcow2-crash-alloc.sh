#!/usr/bin/env bash
# Crash safety of batched allocating writes
# (lib/image/image-qcow2-slow.c, "batched writes"): on a fresh qcow2
# image with 64 KiB clusters, where nearly every 4k write allocates a
# cluster and only the 4k are written (the rest of the cluster is a
# hole), fio writes at QD32 and the daemon is killed with SIGKILL at a
# random moment, several times on the same image.
#
# Each round first writes a region of its own at QD32 with fio (4k random
# writes into fresh clusters, then a flush at the end: acknowledged and
# flushed), then starts a second fio at QD32 over the rest of the disk (a
# flush every 64 writes, so writebacks run too) and kills the daemon under
# it.  After every crash `qemu-img check' may report leaked clusters but
# never corruption, and the flushed regions of all rounds so far verify
# (fio --verify_only on the image converted to raw, so QEMU's reader is
# the judge of what the file holds).

source "$(dirname "$0")/functions.sh"
requires fio qemu-img
fio --enghelp=nbd >/dev/null 2>&1 || skip "fio has no nbd engine"
cd "$tmp"

img=alloc.qcow2
qemu-img create -q -f qcow2 -o cluster_size=65536 $img 1G

# job NAME REGION: a fio job writing 4k at random into 16 MiB region
# REGION (0-3) with a fixed seed, so --verify_only finds the same data.
job()
{
    cat <<JOB
[global]
rw=randwrite
bs=4k
iodepth=32
offset=$(( $2 * 16 ))M
size=16M
io_size=8M
randseed=$(( 1000 + $2 ))
verify=crc32c
verify_state_save=0
end_fsync=1
[$1]
JOB
}

for i in 0 1 2 3; do
    start_filterd --image $img
    job flushed$i $i >flushed$i.fio
    # Acknowledged and flushed: must survive every later crash.
    fio --ioengine=nbd --uri="$uri" --do_verify=0 flushed$i.fio >fio$i.out 2>&1 ||
        { cat fio$i.out; die "round $i: fio failed"; }
    # The rest of the disk, killed under it.
    fio --ioengine=nbd --uri="$uri" --name=crash --rw=randwrite --bs=4k --iodepth=32 \
        --offset=64M --size=960M --time_based --runtime=30 --randrepeat=0 --fsync=64 \
        >crash.out 2>&1 &
    fiopid=$!
    sleep "$("$PYTHON" -c 'import random; print(round(random.uniform(0.3, 1.5), 2))')"
    kill -KILL "$pid"
    wait "$pid" 2>/dev/null || true
    wait "$fiopid" 2>/dev/null || true
    status=0
    qemu-img check $img >check.out 2>&1 || status=$?
    case $status in
        0|3) ;;                      # clean, or leaked clusters only
        *) cat check.out; die "qemu-img check after crash $i: status $status" ;;
    esac
    grep -q "ERROR" check.out && { cat check.out; die "corruption after crash $i"; }
    rm -f out.raw
    qemu-img convert -O raw $img out.raw
    for (( j = 0; j <= i; j++ )); do
        fio --ioengine=psync --filename=out.raw --verify_only flushed$j.fio \
            >verify.out 2>&1 ||
            { cat verify.out; die "crash $i: flushed region $j lost data"; }
    done
    echo "crash $i: $(grep -Eo '[0-9]+ leaked clusters' check.out || echo 'no leaks')," \
         "$(grep -Eo '[0-9]+/[0-9]+ = [0-9.]+% allocated' check.out)"
done

# After the crashes, a clean run leaves a clean image that reads back.
qemu-img check -q -r leaks $img >/dev/null 2>&1 || true
start_filterd --image $img
job final 3 | sed 's/^offset=.*/offset=900M/' >final.fio
fio --ioengine=nbd --uri="$uri" --do_verify=1 final.fio >fio.out 2>&1 ||
    { cat fio.out; die "fio write+verify through NBD after the crashes failed"; }
stop_filterd
qemu-img check $img >check.out 2>&1 || { cat check.out; die "not clean after a clean run"; }

# Test builds: the same through the eventfd completions of kernels without
# IORING_OP_MSG_RING.
if [ "${CBT_FAULT_INJECTION:-0}" = 1 ]; then
    CBT_QCOW2_NO_MSG_RING=1 start_filterd --image $img
    job final 3 | sed 's/^offset=.*/offset=800M/' >final.fio
    fio --ioengine=nbd --uri="$uri" --do_verify=1 final.fio >fio.out 2>&1 ||
        { cat fio.out; die "fio write+verify through NBD (eventfd) failed"; }
    stop_filterd
    qemu-img check $img >check.out 2>&1 ||
        { cat check.out; die "not clean after a clean run (eventfd)"; }

    # Failed data writes inside batches: the requests fail, their clusters
    # are given back (no leak, no corruption), the others go on.
    qemu-img create -q -f qcow2 -o cluster_size=65536 fi.qcow2 1G
    CBT_FI_FAIL="image:write:200+20:EIO" start_filterd --image fi.qcow2
    fio --ioengine=nbd --uri="$uri" --name=fi --rw=randwrite --bs=4k --iodepth=32 \
        --number_ios=4000 --randrepeat=0 --continue_on_error=all >fio.out 2>&1 || true
    grep -q "image write 219: EIO" "$log" ||
        { cat fio.out; die "the injected write errors did not happen"; }
    grep -Eq "err= *[1-9]|error=" fio.out ||
        { cat fio.out; die "fio saw no write errors"; }
    stop_filterd
    qemu-img check fi.qcow2 >check.out 2>&1 ||
        { cat check.out; die "failed batched writes left leaks or corruption"; }
    echo "$(grep -c 'fault injection: image write' "$log") batched writes failed, image clean"
fi
