#!/usr/bin/env bash
# The TCP listener: --listen 127.0.0.1:PORT serves the export (nbdinfo,
# qemu-io read/write, libnbd), and the port is closed after SIGTERM.

source "$(dirname "$0")/functions.sh"
requires nbdinfo qemu-io

disk=$tmp/disk.img
size=$((2 * 1024 * 1024))
make_pattern_file "$disk" $size 0x33

# An ephemeral port that was free a moment ago.
port=$(free_tcp_port)
start_filterd --image "$disk" --listen 127.0.0.1:$port --export-name tcpdisk
[ "$uri" = "nbd://127.0.0.1:$port/tcpdisk" ] || die "unexpected uri $uri"

[ "$(nbdinfo --size "$uri")" = $size ] || die "nbdinfo --size over TCP"
nbdinfo --json "$uri" | grep -q '"export-name": "tcpdisk"' ||
    die "nbdinfo over TCP: export name"

qio -f raw "$uri" -c 'write -P 0x44 12345 6789' -c flush
qio -f raw -r "$uri" -c 'read -P 0x33 0 12345' -c 'read -P 0x44 12345 6789' \
    -c "read -P 0x33 $((12345 + 6789)) 100000"
qio -f raw -r "$disk" -c 'read -P 0x44 12345 6789' -c 'read -P 0x33 12344 1'

stop_filterd
status=0
nbdinfo --can connect "nbd://127.0.0.1:$port/tcpdisk" 2>/dev/null || status=$?
[ $status -ne 0 ] || die "port $port still accepts connections after SIGTERM"
