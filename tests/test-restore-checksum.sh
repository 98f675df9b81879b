#!/usr/bin/env bash
# The manifest's chunk checksums come in two algorithms, named per backup
# entry ("checksum": "sha256" or "xxh128", the sums under that name), and
# every reader checks whichever an entry has (cbt/repo/manifest.c, checksum.c):
#
#   - cbt backup --checksum sha256 writes a version 1 manifest (what cbt
#     before "checksum" reads); the default for a directory is xxh128,
#     and one xxh128 entry makes the manifest version 2;
#   - a chain that mixes them (a sha256 full, an xxh128 incremental)
#     verifies and restores byte-exact; cbt list --json names each
#     entry's algorithm and leaves out the sums;
#   - each sum is the text sha256sum or xxh128sum prints for that chunk of
#     the file (the xxh128sum part is skipped when it is not installed);
#   - a manifest entry without "checksum" (as cbt wrote them before it
#     existed) is SHA-256: it verifies and restores, and a flipped byte in
#     it is caught by verify and restore with exit 4 naming the range;
#   - a flipped byte in the xxh128 incremental's data is caught the same
#     way.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq cmp od dd sha256sum "$PYTHON"

size=$((96 * 1024 * 1024))
disk=$tmp/disk.img
repo=$tmp/repo
csock=$tmp/ctl.sock
head -c "$size" /dev/urandom >"$disk"
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --control "$csock"

expect_rc 2 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --checksum md5
has "--checksum must be xxh128 or sha256"

expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --full \
    --checksum sha256
m=$repo/manifest.json
[ "$(jq '.version' "$m")" = 1 ] || die "a sha256-only manifest should be version 1"
[ "$(jq -r '.backups[0].checksum' "$m")" = sha256 ] || die "backup 1 is not sha256"
[ "$(jq '.backups[0].sha256 | length' "$m")" -eq 2 ] ||
    die "the sha256 full backup should have two checksums"
[ "$(jq '.backups[0] | has("xxh128")' "$m")" = false ] || die "backup 1 has xxh128 sums"

cp "$disk" "$tmp/disk1.img"
# 80 MiB: the incremental's data reaches its second chunk.
qio -f raw "$uri" -c 'write -P 0x5a 8M 80M' -c 'write -z 90M 2M'
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --incremental
stop_filterd
[ "$(jq '.version' "$m")" = 2 ] || die "a manifest with xxh128 should be version 2"
[ "$(jq -r '.backups[1].checksum' "$m")" = xxh128 ] ||
    die "the incremental should have the directory default, xxh128"
[ "$(jq '.backups[1].xxh128 | length' "$m")" -ge 2 ] ||
    die "the incremental should have at least two checksum chunks"
full=$(jq -r '.backups[0].file' "$m")
inc=$(jq -r '.backups[1].file' "$m")

# The mixed chain.
expect_rc 0 cbt verify --repo "$repo"
has "all checksums and chains OK"
expect_rc 0 cbt restore --repo "$repo" --output "$tmp/mixed.raw"
has "checksums verified"
cmp "$disk" "$tmp/mixed.raw" || die "the mixed chain restored other bytes"
cbt list --repo "$repo" --json >"$tmp/list.json"
[ "$(jq -c '[.backups[].checksum]' "$tmp/list.json")" = '["sha256","xxh128"]' ] ||
    die "cbt list --json: $(jq -c '[.backups[].checksum]' "$tmp/list.json")"
[ "$(jq '[.backups[] | has("sha256") or has("xxh128")] | any' "$tmp/list.json")" = false ] ||
    die "cbt list --json shows the sums"

# The sums are what the standard tools print for each chunk.
chunk() { dd if="$1" bs=64M skip="$2" count=1 iflag=fullblock status=none; }
[ "$(chunk "$repo/$full" 1 | sha256sum | cut -d' ' -f1)" = \
  "$(jq -r '.backups[0].sha256[1]' "$m")" ] || die "sha256sum disagrees on chunk 1"
if command -v xxh128sum >/dev/null; then
    for k in 0 1; do
        [ "$(chunk "$repo/$inc" $k | xxh128sum | cut -d' ' -f1)" = \
          "$(jq -r ".backups[1].xxh128[$k]" "$m")" ] ||
            die "xxh128sum disagrees on chunk $k of $inc"
    done
else
    echo "$progname: xxh128sum is not installed: not cross-checked"
fi

# An old-format manifest: no "checksum" in an entry means SHA-256.
old=$tmp/old
cp -a "$repo" "$old"
"$PYTHON" - "$old/manifest.json" <<'PY'
import json, sys
path = sys.argv[1]
with open(path) as f:
    m = json.load(f)
del m["backups"][0]["checksum"]
with open(path, "w") as f:
    json.dump(m, f, indent=2)
PY
[ "$(jq '.backups[0] | has("checksum")' "$old/manifest.json")" = false ] ||
    die "the edit left \"checksum\""
expect_rc 0 cbt verify --repo "$old"
expect_rc 0 cbt restore --repo "$old" --output "$tmp/old.raw"
cmp "$disk" "$tmp/old.raw" || die "the old-format chain restored other bytes"
expect_rc 0 cbt restore --repo "$old" --at 1 --output "$tmp/old1.raw"
cmp "$tmp/disk1.img" "$tmp/old1.raw" || die "the old-format full backup restored other bytes"

# A byte of the full backup's second chunk: a checked restore reads every
# byte of the chain, so it need not be guest data the incremental shows
# (test-restore-verify shows that such a byte reaches an unchecked one).
end=$(( $(jq '.backups[0]["file-size"]' "$m") - 1 ))
flip_byte "$old/$full" $(( (64 << 20) + 4321 ))
expect_rc 4 cbt verify --repo "$old"
has "$old/$full: checksum mismatch in bytes 67108864..$end (chunk 1)"
expect_rc 4 cbt restore --repo "$old" --output "$tmp/oldbad.raw"
has "$old/$full: checksum mismatch in bytes 67108864..$end (chunk 1)"
[ ! -e "$tmp/oldbad.raw" ] || die "a failed restore left its output"

# A flipped byte in the xxh128 incremental's data (its first chunk holds
# its first data clusters, after the header and tables).
bad=$tmp/bad
cp -a "$repo" "$bad"
flip_byte "$bad/$inc" $((32 << 20))
expect_rc 4 cbt verify --repo "$bad"
has "$bad/$inc: checksum mismatch in bytes 0..67108863 (chunk 0)"
expect_rc 4 cbt restore --repo "$bad" --output "$tmp/bad.raw"
has "$bad/$inc: checksum mismatch in bytes 0..67108863 (chunk 0)"
echo "checksums: sha256, xxh128, old-format and mixed chains verify and restore"
