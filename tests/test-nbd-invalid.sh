#!/usr/bin/env bash
# Invalid requests (nbd-invalid.py): out of range, offset+length overflow,
# over the 32 MiB maximum, undefined flags.  Each gets an NBD error, the
# connection and the daemon keep working, and the image is untouched;
# except a WRITE over the maximum, which closes its connection at once
# (nbd-oversized.py: headers of 33 MiB to 4 GiB followed by 4 KiB of data
# used to leave the daemon waiting for the rest), while other clients are
# served on.

source "$(dirname "$0")/functions.sh"
requires cmp nbdinfo
requires_python_nbd

disk=$tmp/disk.img
size=$((40 * 1024 * 1024 + 1000))
make_pattern_file "$disk" $size 0x77
cp "$disk" "$tmp/orig.img"

start_filterd --image "$disk"
"$PYTHON" "$testsdir/nbd-invalid.py" "$uri" $size
"$PYTHON" "$testsdir/nbd-oversized.py" "$sock" $size
grep -q "WRITE of 4294967295 bytes, more than the maximum payload of 33554432 bytes; closing" "$log" ||
    die "no log line naming the oversized WRITE"
# Still serving new connections.
[ "$(nbdinfo --size "$uri")" = $size ] || die "daemon not serving after invalid requests"
stop_filterd
cmp "$disk" "$tmp/orig.img" || die "image changed by rejected requests"
