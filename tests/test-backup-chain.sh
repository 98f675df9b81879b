#!/usr/bin/env bash
# cbt backup / restore / verify / list against the real daemon: a full
# backup, then three rounds of changes (write, write -z, discard) each
# followed by an incremental.  At every point a copy of the image is taken
# (no writes run meanwhile) and the restore of that backup must equal it
# byte for byte (qemu-img compare), to raw, to qcow2 and to an NBD export.
# Incrementals copy no more than the dirty granules and store zeroed or
# discarded ranges as zero clusters; every file passes qemu-img check and
# qemu-img reads the chain.  Then verify catches an altered and a missing
# file, naming file and offset.

source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img jq cmp

disk=$tmp/disk.img
repo=$tmp/repo
csock=$tmp/ctl.sock
truncate -s 64M "$disk"
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --control "$csock"
dsock=$sock

io() { qio -f raw "$uri" "$@"; }

# backup ARGS...: run a backup with --json; leaves its summary in $summary.
backup()
{
    summary=$(cbt backup --socket "$dsock" --control "$csock" --repo "$repo" --json "$@" \
              2>"$tmp/backup.err") || {
        cat "$tmp/backup.err" >&2
        die "cbt backup $*: exit $?"
    }
}
field() { jq -r ".$1" <<<"$summary"; }

# --connections: 1 to 64; without it one per CPU (2 to 4), which every
# backup below uses.
for n in 0 65 -1 x; do
    expect_rc 2 cbt backup --socket "$dsock" --control "$csock" --repo "$repo" --connections "$n"
    case $n in
    x) has "--connections" ;;
    *) has "--connections must be 1 to 64" ;;
    esac
    [ ! -e "$repo" ] || die "a refused backup (--connections $n) created the repository"
done

# Point 1: some data, a hole, a pattern that straddles granules.
io -c 'write -P 0x11 0 1M' -c 'write -P 0x22 8M 300k' -c 'write -P 0x33 63M 1M'
backup
[ "$(field kind)" = full ] || die "first backup is not full: $summary"
grep -q 'the repository is empty: taking a full backup' "$tmp/backup.err" ||
    die "full backup without the reason: $(cat "$tmp/backup.err")"
cp --sparse=always "$disk" "$tmp/point1.raw"
files=("$(field file)")

# Three rounds of changes.  Expected dirty bytes are whole 64 KiB granules.
rounds=(
    "write -P 0x44 4k 4k|write -z 8M 128k|discard 63M 64k|65536 131072 65536"
    "write -P 0x55 100k 100k|write -z 0 64k|write -P 0x66 40M 1M|196608 65536 1048576"
    "discard 0 1M|write -P 0x77 8200k 8k|write -z 63M 1M|1048576 65536 1048576"
)
for r in 1 2 3; do
    IFS='|' read -r c1 c2 c3 sizes <<<"${rounds[r-1]}"
    io -c "$c1" -c "$c2" -c "$c3"
    expect=0
    for s in $sizes; do expect=$((expect + s)); done
    # Round 3's discard of 0..1M overlaps round 2's zeroed granule: the
    # granules are distinct within a round, so the sum is exact.
    backup --incremental
    [ "$(field kind)" = incremental ] || die "round $r: not incremental: $summary"
    [ "$(field '"dirty-bytes"')" -eq "$expect" ] ||
        die "round $r: dirty bytes $(field '"dirty-bytes"'), expected $expect"
    [ "$(field '"bytes-copied"')" -le "$(field '"dirty-bytes"')" ] ||
        die "round $r: copied more than the dirty granules: $summary"
    [ "$(field '"zero-bytes"')" -gt 0 ] ||
        die "round $r: zeroed/discarded ranges not stored as zero clusters: $summary"
    [ "$(field backing)" = "${files[-1]}" ] || die "round $r: wrong backing: $summary"
    cp --sparse=always "$disk" "$tmp/point$((r + 1)).raw"
    files+=("$(field file)")
done

# Every file is a clean qcow2 image; qemu-img reads the newest chain.
for f in "${files[@]}"; do
    qemu-img check -q "$repo/$f" || die "qemu-img check $f failed"
done
qemu-img compare -q -f raw -F qcow2 "$tmp/point4.raw" "$repo/${files[3]}" ||
    die "qemu-img does not read the newest chain as the image"

# Restore every point, to raw (sparse) and compare bytes.
for i in 1 2 3 4; do
    cbt restore --repo "$repo" --at "$i" --output "$tmp/r$i.raw" 2>/dev/null ||
        die "restore --at $i failed"
    cmp "$tmp/point$i.raw" "$tmp/r$i.raw" || die "restore --at $i differs from point $i"
done
# The raw output is sparse: far less allocated than its 64 MiB.
[ "$(du -k "$tmp/r1.raw" | cut -f1)" -lt 8192 ] || die "restored raw file is not sparse"
# By file name, to qcow2.
cbt restore --repo "$repo" --at "${files[1]}" --output "$tmp/r2.qcow2" 2>/dev/null
qemu-img check -q "$tmp/r2.qcow2" || die "restored qcow2 is not clean"
qemu-img compare -q -f raw -F qcow2 "$tmp/point2.raw" "$tmp/r2.qcow2" ||
    die "restore to qcow2 differs from point 2"
# To an NBD export holding other data (a second daemon): zeros are written.
make_pattern_file "$tmp/target.raw" 67108864 0xee
start_filterd --image "$tmp/target.raw"
cbt restore --repo "$repo" --output "$uri" 2>/dev/null || die "restore to $uri failed"
stop_filterd
cmp "$tmp/point4.raw" "$tmp/target.raw" || die "restore to NBD differs from point 4"
# An existing output is never overwritten.
out=$(cbt restore --repo "$repo" --output "$tmp/r1.raw" 2>&1) && die "restore overwrote a file"
grep -q 'exists' <<<"$out" || die "unexpected message: $out"

# list --json: four backups in one chain, newest last.
lj=$(cbt list --repo "$repo" --json)
jq -e '.count == 4 and .chains == 1 and
       ([.backups[].kind] == ["full","incremental","incremental","incremental"]) and
       ([.backups[].chain] | unique == [1])' <<<"$lj" >/dev/null || die "list --json: $lj"
[ "$(jq -r '.backups[3].file' <<<"$lj")" = "${files[3]}" ] || die "list order: $lj"
cbt list --repo "$repo" | grep -q "^chain 1:" || die "human list has no chain header"

# verify: clean, then one altered byte (offset named), then a missing file.
cbt verify --repo "$repo" >/dev/null 2>&1 || die "verify failed on a good repository"
f=$repo/${files[1]}
cp "$f" "$tmp/saved.qcow2"
size=$(stat -c %s "$f")
printf 'X' | dd of="$f" bs=1 seek=$((size - 100)) conv=notrunc status=none
status=0; out=$(cbt verify --repo "$repo" 2>&1) || status=$?
[ $status -eq 4 ] || die "verify of an altered file: exit $status, expected 4: $out"
grep -q "${files[1]}: checksum mismatch in bytes 0\.\.$((size - 1))" <<<"$out" ||
    die "verify does not name file and range: $out"
cp "$tmp/saved.qcow2" "$f"
rm "$repo/${files[2]}"
status=0; out=$(cbt verify --repo "$repo" --json 2>/dev/null) || status=$?
[ $status -eq 4 ] || die "verify of a missing file: exit $status, expected 4"
jq -e --arg f "${files[2]}" '.ok == false and
    ([.backups[] | select(.ok == false) | .file] == [$f])' <<<"$out" >/dev/null ||
    die "verify --json: $out"
status=0; cbt restore --repo "$repo" --output "$tmp/broken.raw" 2>/dev/null || status=$?
[ $status -ne 0 ] && [ ! -e "$tmp/broken.raw" ] ||
    die "restore with a missing chain file: exit $status, output left behind"
exit 0
