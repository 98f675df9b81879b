#!/usr/bin/env bash
# --image memory:SIZE (issue 12): a sparse disk in RAM.  Real clients write
# and read it, base:allocation reports holes where nothing was written and
# after a whole-chunk trim, fio verifies random writes, dirty tracking and a
# full + incremental backup work on it (restore == the disk), a point-in-time
# view works on it, a bitmap left by an earlier run is refused (the disk
# starts empty), and bad sizes are refused.

source "$(dirname "$0")/functions.sh"
requires qemu-io nbdinfo nbdcopy jq cmp

csock=$tmp/ctl.sock
repo=$tmp/repo
start_filterd --image memory:64M --bitmap "$tmp/mem.bitmap" --control "$csock"
[ "$(nbdinfo --size "$uri")" = 67108864 ] || die "size of memory:64M is not 64 MiB"
qio -f raw "$uri" -c 'read -P 0 0 64M'
qio -f raw "$uri" -c 'write -P 0x11 0 1M' -c 'write -P 0x22 10M 100k' \
    -c 'write -P 0x33 63M 1M' -c 'write -z -u 10M 64k' -c 'discard 63M 128k'
qio -f raw "$uri" -c 'read -P 0x11 0 1M' -c 'read -P 0 10M 64k' \
    -c 'read -P 0x22 10551296 36864' -c 'read -P 0 63M 128k' -c 'read -P 0x33 66191360 917504'
map=$(nbdinfo --map --json "$uri" | jq -c '[.[] | select(.type == 0) | [.offset, .length]]')
[ "$map" = '[[0,1048576],[10551296,65536],[66191360,917504]]' ] ||
    die "base:allocation of the memory disk: $map"

# fio writes and verifies.
if fio --enghelp=nbd >/dev/null 2>&1; then
    (cd "$tmp" && fio --name=v --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k \
         --iodepth=16 --size=32m --offset=16m --verify=crc32c --do_verify=1 \
         >"$tmp/fio.out" 2>&1) || { cat "$tmp/fio.out"; die "fio verify on memory failed"; }
fi

# Backups: full, then an incremental after more writes, each restoring to
# the disk.
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo"
qio -f raw "$uri" -c 'write -P 0x44 5M 256k'
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --incremental
has "incremental"
nbdcopy "$uri" "$tmp/now.raw"
cbt restore --repo "$repo" --output "$tmp/r.raw" >/dev/null 2>&1 || die "restore failed"
cmp "$tmp/now.raw" "$tmp/r.raw" || die "restore differs from the memory disk"

# A point-in-time view of it.
ctl "$csock" '{"execute":"checkpoint-begin","arguments":{"point-in-time":"full"}}' >/dev/null
qio -f raw "$uri" -c 'write -P 0x55 0 2M'
nbdcopy "nbd+unix:///@checkpoint?socket=$sock" "$tmp/view.raw"
cmp "$tmp/now.raw" "$tmp/view.raw" || die "the view of the memory disk is not the checkpoint"
ctl "$csock" '{"execute":"checkpoint-abort"}' >/dev/null
stop_filterd

# The disk starts empty: an old bitmap would lie.
expect_rc 1 "$CBT_FILTERD" --image memory:64M --socket "$tmp/x.sock" --bitmap "$tmp/mem.bitmap"
has "starts empty"
for bad in memory:0 memory:12Q memory:-5M memory: memory:2000000T; do
    expect_rc 1 "$CBT_FILTERD" --image "$bad" --socket "$tmp/x.sock"
    has "expected a size"
done
echo "memory:SIZE disk: OK"
