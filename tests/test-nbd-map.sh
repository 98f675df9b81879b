#!/usr/bin/env bash
# Sparseness: nbdinfo --map and qemu-img map show data where writes landed
# and holes elsewhere on a sparse image; TRIM turns data back into a hole;
# a partial TRIM keeps the bytes around it.  nbd-structured.py checks hole
# chunks, DF and REQ_ONE with libnbd.

source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img nbdinfo jq
requires_python_nbd

disk=$tmp/disk.img
truncate -s 8M "$disk"
start_filterd --image "$disk"

# map_is EXPECTED: nbdinfo --map, adjacent extents of one type merged,
# as "offset length type" lines.
map_is()
{
    local got
    got=$(nbdinfo --map --json "$uri" | jq -r '
        reduce .[] as $e ([];
            if length > 0 and .[-1].type == $e.type
            then .[-1].length += $e.length else . + [$e] end)
        | .[] | "\(.offset) \(.length) \(.type)"')
    [ "$got" = "$1" ] || die "nbdinfo --map: expected
$1
got
$got"
}

M=1048576
map_is "0 $((8 * M)) 3"

qio -f raw "$uri" -c 'write -P 0xa1 1M 64k' -c 'write -P 0xa2 5M 128k'
map_is "0 $M 3
$M 65536 0
$((M + 65536)) $((4 * M - 65536)) 3
$((5 * M)) 131072 0
$((5 * M + 131072)) $((3 * M - 131072)) 3"

# qemu's NBD client sees the same.
qemu-img map --output=json -f raw "$uri" >"$tmp/qmap.json"
jq -e "map(select(.data)) | map([.start, .length]) ==
       [[$M, 65536], [$((5 * M)), 131072]]" "$tmp/qmap.json" >/dev/null ||
    { cat "$tmp/qmap.json"; die "qemu-img map: wrong data extents"; }

"$PYTHON" "$testsdir/nbd-structured.py" "$uri"

# TRIM the first extent: a hole again, in the map and in the raw file.
qio -f raw "$uri" -c 'discard 1M 64k' -c flush
map_is "0 $((5 * M)) 3
$((5 * M)) 131072 0
$((5 * M + 131072)) $((3 * M - 131072)) 3"
[ "$(stat -c %b "$disk")" -gt 0 ] || die "image has no blocks left"

# A TRIM that is not block aligned must not touch the bytes around it.
qio -f raw "$uri" -c 'discard 5001k 5000' -c flush
qio -f raw -r "$uri" \
    -c 'read -P 0xa2 5M 1k' \
    -c 'read -P 0 5001k 5000' \
    -c "read -P 0xa2 $((5 * M + 1024 + 5000)) $((131072 - 1024 - 5000))" \
    -c 'read -P 0 1M 64k'

stop_filterd
qio -f raw -r "$disk" -c 'read -P 0 1M 64k' -c 'read -P 0xa2 5M 1k' \
    -c 'read -P 0 5001k 5000'
