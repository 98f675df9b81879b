#!/usr/bin/env bash
# Handshake and protocol edge cases over raw sockets (nbd-options.py).

source "$(dirname "$0")/functions.sh"
requires nbdinfo

disk=$tmp/disk.img
size=$((1024 * 1024 + 512))
make_pattern_file "$disk" $size 0x5a
start_filterd --image "$disk" --export-name rawdisk
"$PYTHON" "$testsdir/nbd-options.py" "$sock" rawdisk $size
[ "$(nbdinfo --size "$uri")" = $size ] || die "daemon not serving after the option tests"
stop_filterd
