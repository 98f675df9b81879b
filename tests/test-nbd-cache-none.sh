#!/usr/bin/env bash
# --cache none: the image is opened O_DIRECT (seen in /proc/PID/fdinfo;
# the default writeback mode must not be), and the read/write and fio
# verification tests pass unchanged, unaligned requests included.

source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img cmp fio

# image_fd_flags: the octal open flags of each of the daemon's fds on
# $disk, one a line (it may keep a buffered fd next to the O_DIRECT one).
image_fd_flags()
{
    local fd
    for fd in /proc/"$pid"/fd/*; do
        if [ "$(readlink "$fd")" = "$disk" ]; then
            awk '/^flags:/ { print $2 }' /proc/"$pid"/fdinfo/"${fd##*/}"
        fi
    done
}
# O_DIRECT is 040000 on x86 and most other architectures, not all.
case "$(uname -m)" in
    x86_64|i?86|s390x|riscv64|loongarch64) o_direct=$((8#40000)) ;;
    aarch64|arm*) o_direct=$((8#200000)) ;;
    *) o_direct= ;;
esac

disk=$tmp/disk.img
truncate -s 1M "$disk"
for mode in none writeback; do
    start_filterd --image "$disk" --cache $mode
    flags=$(image_fd_flags)
    if [ -z "$flags" ]; then
        echo "note: no fd on $disk in /proc/$pid/fd (fixed files?), O_DIRECT not checked"
    elif [ -n "$o_direct" ]; then
        ndirect=0
        for f in $flags; do
            (( 8#$f & o_direct )) && ndirect=$((ndirect + 1))
        done
        if [ $mode = none ] && [ $ndirect -eq 0 ]; then
            die "--cache none: no image fd has O_DIRECT (flags:" $flags ")"
        elif [ $mode = writeback ] && [ $ndirect -ne 0 ]; then
            die "--cache writeback: an image fd has O_DIRECT (flags:" $flags ")"
        fi
    fi
    stop_filterd
done

CBT_TEST_CACHE=none bash "$testsdir/test-nbd-rw.sh" ||
    die "test-nbd-rw.sh failed with --cache none"
CBT_TEST_CACHE=none bash "$testsdir/test-nbd-fio.sh" ||
    die "test-nbd-fio.sh failed with --cache none"
