#!/usr/bin/env bash
# Writes through NBD with qemu-io (plain, unaligned, FUA, WRITE_ZEROES with
# and without unmap, TRIM, FLUSH, several requests in flight) and checks the
# raw image byte for byte against the same operations applied to a copy by
# qemu-io directly.  TRIM must punch a hole in the raw file.
#
# CBT_TEST_CACHE=none runs it with --cache none (test-nbd-cache-none.sh).

source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img cmp

disk=$tmp/disk.img
ref=$tmp/ref.img
size=$((4 * 1024 * 1024))
make_pattern_file "$disk" $size 0x11
cp "$disk" "$ref"

start_filterd --image "$disk" ${CBT_TEST_CACHE:+--cache "$CBT_TEST_CACHE"}

ops=(
    'write -P 0xa1 0 64k'
    'write -P 0xa2 69631 3'
    'write -P 0xa3 1000000 12345'
    'write -f -P 0xa4 1M 128k'
    'write -f -P 0xa6 1500001 999'
    "write -P 0xa5 $((size - 1)) 1"
    'write -z 2M 64k'
    'write -z 2200000 777'
    'write -z -u 2304k 64k'
    'write -z -f 2500000 5000'
    'aio_write -P 0xb1 2560k 4k'
    'aio_write -P 0xb2 2700001 100000'
    'aio_write -P 0xb3 2800k 1k'
    'aio_flush'
    'discard 3M 64k'
    'flush'
)
qio_args=()
for op in "${ops[@]}"; do qio_args+=(-c "$op"); done
qio -f raw "$uri" "${qio_args[@]}"
qio -f raw "$ref" "${qio_args[@]}"

# Read back through NBD, in a new connection: exact bytes at odd offsets
# and at the edges of each write.
qio -f raw -r "$uri" \
    -c 'read -P 0xa1 0 64k' \
    -c 'read -P 0x11 64k 4095' \
    -c 'read -P 0xa2 69631 3' \
    -c 'read -P 0x11 69634 1' \
    -c 'read -P 0x11 999999 1' \
    -c 'read -P 0xa3 1000000 12345' \
    -c 'read -P 0x11 1012345 1' \
    -c 'read -P 0xa4 1M 128k' \
    -c 'read -P 0xa6 1500001 999' \
    -c "read -P 0x11 $((size - 2)) 1" \
    -c "read -P 0xa5 $((size - 1)) 1" \
    -c 'read -P 0 2M 64k' \
    -c 'read -P 0x11 2199999 1' \
    -c 'read -P 0 2200000 777' \
    -c 'read -P 0x11 2200777 1' \
    -c 'read -P 0 2304k 64k' \
    -c 'read -P 0 2500000 5000' \
    -c 'read -P 0xb1 2560k 4k' \
    -c 'read -P 0xb2 2700001 100000' \
    -c 'read -P 0xb3 2800k 1k' \
    -c 'read -P 0 3M 64k' \
    -c 'read -P 0x11 3136k 64k'

# Whole image through NBD, then the file itself while the daemon runs
# (everything was acknowledged and flushed), then after shutdown.
qemu-img compare -f raw -F raw "$uri" "$ref" ||
    die "image read through NBD differs from the reference"
cmp "$disk" "$ref" || die "raw file differs from the reference after FLUSH"

# TRIM of an aligned range must leave a hole in the raw file.
"$PYTHON" - "$disk" $((3 * 1024 * 1024)) <<'PY' || die "TRIM did not punch a hole"
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
off = int(sys.argv[2])
hole = os.lseek(fd, off, os.SEEK_HOLE)
if hole != off:
    sys.exit(f"offset {off}: next hole at {hole}")
PY

stop_filterd
cmp "$disk" "$ref" || die "raw file differs from the reference after shutdown"
[ "$(stat -c %s "$disk")" -eq $size ] || die "image size changed"
