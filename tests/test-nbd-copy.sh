#!/usr/bin/env bash
# Bulk copies in and out: qemu-img convert and nbdcopy -C 4 (four
# connections, since the export is multi-conn) into the export and back
# out, compared with cmp and qemu-img compare.  The sources mix random
# data, zeroed ranges and holes so the clients use WRITE_ZEROES/TRIM too.

source "$(dirname "$0")/functions.sh"
requires qemu-img nbdcopy cmp head dd fallocate

size=$((16 * 1024 * 1024))
disk=$tmp/disk.img
truncate -s $size "$disk"

# make_source FILE: random data with a zeroed stretch and a hole.
make_source()
{
    head -c $size /dev/urandom >"$1"
    dd if=/dev/zero of="$1" bs=64k seek=64 count=16 conv=notrunc status=none
    fallocate -p -o $((10 * 1024 * 1024)) -l $((2 * 1024 * 1024)) "$1"
    # An odd-sized tail-end write so ranges are not all aligned.
    printf 'tail' | dd of="$1" bs=1 seek=$((size - 4)) conv=notrunc status=none
}
make_source "$tmp/src1.img"
make_source "$tmp/src2.img"
cmp -s "$tmp/src1.img" "$tmp/src2.img" && die "random sources are equal"

start_filterd --image "$disk"

# qemu-img in and out.
qemu-img convert -n -f raw -O raw "$tmp/src1.img" "$uri"
qemu-img compare -f raw -F raw "$tmp/src1.img" "$uri" ||
    die "qemu-img compare: export differs from src1 after convert in"
qemu-img convert -f raw -O raw "$uri" "$tmp/out1.img"
cmp "$tmp/src1.img" "$tmp/out1.img" || die "convert out differs from src1"

# nbdcopy in (over the previous contents) and out.
nbdcopy -C 4 --flush "$tmp/src2.img" "$uri"
nbdcopy -C 4 "$uri" "$tmp/out2.img"
cmp "$tmp/src2.img" "$tmp/out2.img" || die "nbdcopy out differs from src2"

cmp "$tmp/src2.img" "$disk" || die "raw file differs from src2 after nbdcopy"

# NBD to NBD: a second, read-only daemon serves src1 and nbdcopy copies it
# into the first one.
dst_uri=$uri dst_pid=$pid
start_filterd --image "$tmp/src1.img" --read-only
nbdcopy -C 4 --flush "$uri" "$dst_uri"
stop_filterd "$pid"
stop_filterd "$dst_pid"
cmp "$tmp/src1.img" "$disk" || die "raw file differs from src1 after NBD to NBD copy"
