#!/usr/bin/env bash
# The manifest reader (cbt/repo/manifest.c) refuses what it could not write back:
# `cbt list` on a repository whose manifest.json has a value repo_add
# would turn into an unreadable manifest exits 4 (damaged) and names the
# field, instead of reading it.  Found by fuzz/fuzz-manifest (issue 12).
# The manifests are the committed fuzz seed of a real backup, edited.
source "$(dirname "$0")/functions.sh"
requires jq

seed=$CBT_SOURCE_DIR/fuzz/corpus/manifest/one-full
[ -f "$seed" ] || die "missing $seed"
repo=$tmp/repo
mkdir -p "$repo"

# damaged JQ-EDIT MESSAGE: the seed edited by JQ-EDIT is refused naming MESSAGE.
damaged()
{
    local out rc=0
    # jq prints 1e999 as 1.7976931348623157e+308; a literal gets past it.
    jq "$1" "$seed" | sed 's/"SECONDS-LITERAL"/1e999/' >"$repo/manifest.json"
    out=$(cbt list --repo "$repo" 2>&1) || rc=$?
    [ "$rc" = 4 ] || die "manifest edited by '$1': exit $rc, expected 4: $out"
    grep -qF "$2" <<<"$out" || die "manifest edited by '$1': '$out' lacks '$2'"
}

# The seed itself is fine.
cp "$seed" "$repo/manifest.json"
cbt list --repo "$repo" >/dev/null || die "cbt list on the seed manifest failed"

# time-unix past INT64_MAX came back negative from repo_add.
damaged '.backups[0]."time-unix" = 9223372036854775808' '"time-unix" out of range'
# seconds that are not a finite number were written back as "inf"/"nan".
damaged '.backups[0].seconds = "SECONDS-LITERAL"' '"seconds" is not a duration'
damaged '.backups[0].seconds = "12"' '"seconds" is not a duration'
damaged '.backups[0].seconds = -1' '"seconds" is not a duration'

# Chunk checksums (issue 11): "checksum" names the algorithm and the sums
# sit under its name; an entry without it is SHA-256 (old-format-one-full).
for s in one-full old-format-one-full full-two-inc two-chains; do
    cp "$CBT_SOURCE_DIR/fuzz/corpus/manifest/$s" "$repo/manifest.json"
    cbt list --repo "$repo" >/dev/null || die "cbt list on the seed $s failed"
done
damaged '.backups[0].checksum = "md5"' 'checksum algorithm "md5" is not one this cbt knows'
damaged '.backups[0].checksum = 7' '"checksum" has the wrong type'
damaged '.backups[0].checksum = "xxh128"' 'missing "xxh128"'
damaged '.backups[0].checksum = "xxh128" | .backups[0].xxh128 = .backups[0].sha256' \
    'checksum 0 is malformed'
damaged 'del(.backups[0].sha256)' 'missing "sha256"'
damaged '.version = 3' 'manifest version 3 is not supported'
