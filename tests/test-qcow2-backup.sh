#!/usr/bin/env bash
# Dirty tracking on a qcow2 image works exactly as on raw: writes, zeroes
# and discards through the daemon show up as the expected granules, and a
# full + incremental backup of the qcow2 image restores to exactly what
# the guest saw (compared with qemu-img compare against the image itself).

source "$(dirname "$0")/functions.sh"
requires qemu-img qemu-io nbdinfo jq
requires_python_nbd

cbt=${CBT_CLI:-$CBT_BUILD_DIR/cbt/cbt}
disk=$tmp/disk.qcow2
csock=$tmp/ctl.sock
repo=$tmp/repo
qemu-img create -q -f qcow2 -o cluster_size=65536 "$disk" 64M

start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --control "$csock"
qio -f raw "$uri" -c 'write -P 1 0 1M' -c 'write -P 2 10M 100k' -c 'write -P 3 40M 4k'
"$cbt" backup -q --socket "$sock" --control "$csock" --repo "$repo" --full
qemu-img convert -f raw -O raw "$uri" "$tmp/at-full.raw"

qio -f raw "$uri" -c 'write -P 4 10M 4k' -c 'write -z 40M 64k' -c 'discard 0 128k' \
    -c 'write -P 5 63M 1000'
got=$(nbdinfo --map=qemu:dirty-bitmap:cbt --json "$uri" |
      jq -r '[.[] | select(.type == 1) | "\(.offset)+\(.length)"] | join(" ")')
[ "$got" = "0+131072 10485760+65536 41943040+65536 66060288+65536" ] ||
    die "dirty granules on qcow2: got [$got]"
"$cbt" backup -q --socket "$sock" --control "$csock" --repo "$repo" --incremental ||
    die "incremental backup of a qcow2 image failed"
qemu-img convert -f raw -O raw "$uri" "$tmp/at-inc.raw"
stop_filterd
qemu-img check -q "$disk" || die "qemu-img check found problems in the served image"

"$cbt" restore --repo "$repo" --at 1 --output "$tmp/r1.raw"
cmp "$tmp/r1.raw" "$tmp/at-full.raw" || die "full backup of qcow2 restores wrong"
"$cbt" restore --repo "$repo" --output "$tmp/r2.qcow2"
qemu-img compare -q "$tmp/r2.qcow2" "$disk" || die "incremental of qcow2 restores wrong"
qemu-img convert -f qcow2 -O raw "$disk" "$tmp/disk.raw"
cmp "$tmp/at-inc.raw" "$tmp/disk.raw" || die "the image differs from what was served"
