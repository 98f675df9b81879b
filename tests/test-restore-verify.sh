#!/usr/bin/env bash
# cbt restore checks the manifest's checksums while it reads the backup
# files, and restores the same bytes to every kind of output.
#
# A chain of a full backup (96 MiB of random data: two 64 MiB checksum
# chunks, XXH128: the default of a directory repository; the SHA-256 and
# the old-format ones are test-restore-checksum's) and an incremental restores to a raw file, a qcow2 file and an
# NBD export (a second cbt-filterd, written over several connections),
# each the same as the disk.  Then, in a copy of the repository, one byte
# of guest data (one the incremental does not hide) in the full backup's
# second chunk is flipped:
#   - restore exits 4, names the file and the byte range of the damaged
#     chunk, and leaves no output file (to a raw and a qcow2 file) -- before
#     this check existed the restore succeeded with the flipped byte in it;
#   - restore to the NBD export exits 4 the same way;
#   - with --no-verify the restore succeeds, and its output differs from
#     the disk, which shows the flipped byte is really restored data that
#     only the checksums caught;
#   - cbt verify reports the same range.
# A byte flipped in the incremental's metadata (its L1 table, at the end
# of the file) fails the restore the same way.

source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img jq cmp od dd timeout

size=$((96 * 1024 * 1024))
disk=$tmp/disk.img
repo=$tmp/repo
csock=$tmp/ctl.sock
head -c "$size" /dev/urandom >"$disk"
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --control "$csock"
src_pid=$pid src_sock=$sock

cbt backup --socket "$src_sock" --control "$csock" --repo "$repo" --full >/dev/null 2>&1 ||
    die "full backup failed"
qio -f raw "$uri" -c 'write -P 0x5a 80M 1M' -c 'write -z 8M 2M'
cbt backup --socket "$src_sock" --control "$csock" --repo "$repo" --incremental \
    >/dev/null 2>&1 || die "incremental backup failed"
stop_filterd "$src_pid"
full=$(jq -r '.backups[0].file' "$repo/manifest.json")
inc=$(jq -r '.backups[1].file' "$repo/manifest.json")
[ "$(jq -r '.backups[0].checksum' "$repo/manifest.json")" = xxh128 ] &&
    [ "$(jq '.backups[0].xxh128 | length' "$repo/manifest.json")" -eq 2 ] ||
    die "the full backup should have two xxh128 checksum chunks (the default)"

# The untouched chain, to each kind of output.
expect_rc 0 cbt restore --repo "$repo" --output "$tmp/ok.raw"
has "checksums verified"
cmp "$disk" "$tmp/ok.raw" || die "raw restore differs from the disk"
expect_rc 0 cbt restore --repo "$repo" --output "$tmp/ok.qcow2"
qemu-img compare -q -f raw -F qcow2 "$disk" "$tmp/ok.qcow2" ||
    die "qcow2 restore differs from the disk"
qemu-img check -q "$tmp/ok.qcow2" || die "the restored qcow2 file does not check"
# An NBD export that holds other data: every byte must be overwritten,
# zeros included.
head -c "$size" /dev/urandom >"$tmp/target.img"
start_filterd --image "$tmp/target.img"
expect_rc 0 cbt restore --repo "$repo" --output "$uri" --connections 4
stop_filterd
cmp "$disk" "$tmp/target.img" || die "NBD restore differs from the disk"

# A byte of guest data stored in the full backup's second chunk (file
# offsets from 64 MiB), in a cluster the incremental does not hide (it
# rewrote 80M..81M and zeroed 8M..10M): the clusters are stored in the
# order the reads completed, so look the mapping up.
host=$(qemu-img map -f qcow2 --output=json "$repo/$full" |
       jq '[range(65; 90) as $m | ($m * 1048576 + 4321) as $h | .[]
            | select(.data and .offset <= $h and $h < .offset + .length)
            | (.start + $h - .offset) as $g
            | select(($g < 8388608 or $g >= 10485760) and ($g < 83886080 or $g >= 84934656))
            | $h][0]')
[ "$host" != null ] && [ "$host" -ge $((64 << 20)) ] ||
    die "found no guest data of the full backup in its second chunk"
chunk_end=$(( $(jq '.backups[0]["file-size"]' "$repo/manifest.json") - 1 ))
range="bytes 67108864..$chunk_end (chunk 1)"

bad=$tmp/bad
cp -a "$repo" "$bad"
flip_byte "$bad/$full" "$host"

expect_rc 4 timeout 60 "$CBT_CLI" restore --repo "$bad" --output "$tmp/bad.raw"
has "$bad/$full: checksum mismatch in $range"
[ ! -e "$tmp/bad.raw" ] || die "a failed restore left its raw output"
expect_rc 4 timeout 60 "$CBT_CLI" restore --repo "$bad" --output "$tmp/bad.qcow2"
has "$bad/$full: checksum mismatch in $range"
[ ! -e "$tmp/bad.qcow2" ] || die "a failed restore left its qcow2 output"
truncate -s "$size" "$tmp/target2.img"
start_filterd --image "$tmp/target2.img"
expect_rc 4 timeout 60 "$CBT_CLI" restore --repo "$bad" --output "$uri"
has "$bad/$full: checksum mismatch in $range"
stop_filterd

expect_rc 0 cbt restore --repo "$bad" --output "$tmp/unchecked.raw" --no-verify
has "checksums NOT verified"
! cmp -s "$disk" "$tmp/unchecked.raw" ||
    die "the flipped byte did not reach the unchecked restore: the test proves nothing"
expect_rc 4 cbt verify --repo "$bad"
has "$bad/$full: checksum mismatch in $range"

# The incremental's L1 table (metadata at the end of its file).
bad2=$tmp/bad2
cp -a "$repo" "$bad2"
l1=$(qemu-img info -f qcow2 --output=json "$repo/$inc" >/dev/null &&
     od -An -tu8 --endian=big -j 40 -N8 "$repo/$inc" | tr -d ' ')
inc_end=$(( $(jq '.backups[1]["file-size"]' "$repo/manifest.json") - 1 ))
flip_byte "$bad2/$inc" $((l1 + 7))
expect_rc 4 timeout 60 "$CBT_CLI" restore --repo "$bad2" --output "$tmp/bad2.raw"
has "$bad2/$inc"
[ ! -e "$tmp/bad2.raw" ] || die "a failed restore left its raw output"
echo "restore: damaged chunks fail with exit 4 ($range), --no-verify restores them"
