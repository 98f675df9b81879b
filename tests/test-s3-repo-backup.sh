#!/usr/bin/env bash
# cbt backup into an S3 repository (s3://BUCKET/PREFIX) on a real Ceph
# RADOS Gateway (tests/ceph-rgw.sh), against the real daemon:
#   - a full backup larger than the first chunk (so the file is a
#     multipart upload whose part 1, holding the header, is sent last)
#     and two incrementals; list shows them chain by chain; the objects
#     are plain qcow2 files (downloaded with cbt s3 get: qemu-img check,
#     qemu-img compare with the image as it was); every point restores
#     (cbt restore --repo s3://) equal to the image at that point, and
#     verify passes; no multipart upload and no lock object is left;
#   - a full backup writes nothing to local disk (no staging copy) and
#     stays below 400 MiB of memory;
#   - the first chain has SHA-256 checksums (the S3 default), the second
#     full backup is taken with --checksum xxh128 (a multipart upload
#     whose parts the client hashes itself) and its incremental is
#     SHA-256 again: that mixed chain verifies and restores;
#   - cbt prune --keep-chains 1 after a second chain deletes the first
#     chain whole (manifest and objects), the rest still restores, and
#     cbt-nightly.sh runs against the S3 repository with its log lines;
#   - what unfinished runs leave (an unlisted object older than every
#     listed one, one at or past next-seq, an incomplete multipart
#     upload) is removed by the next backup, other objects are not;
#   - errors: a wrong secret key, a missing bucket and an endpoint that
#     is down each exit 1 with one line naming the cause, leave no
#     checkpoint in progress and the repository unchanged (manifest
#     byte for byte, same objects).

source "$(dirname "$0")/functions.sh"
# shellcheck source=tests/ceph-rgw.sh
source "$testsdir/ceph-rgw.sh"
requires ceph-mon ceph-mgr ceph-osd radosgw radosgw-admin monmaptool osdmaptool \
    curl cmp qemu-io qemu-img jq flock

ceph_rgw_start "$tmp/ceph" || die "the Ceph cluster did not come up (see above)"
bucket=s3://cbt-repo
repo=$bucket/vm1
cbt s3 mb "$bucket" || die "cannot create the bucket"

disk=$tmp/disk.img
csock=$tmp/ctl.sock
truncate -s 160M "$disk"
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --control "$csock"
dsock=$sock
io() { qio -f raw "$uri" "$@"; }
status_json() { ctl "$csock" '{"execute":"status"}'; }
no_checkpoint()
{
    local st
    st=$(status_json)
    jq -e '.return.checkpoint == null' <<<"$st" >/dev/null ||
        die "$1: a checkpoint is still in progress: $st"
}

backup()
{
    summary=$(cbt backup --socket "$dsock" --control "$csock" --repo "$repo" --json "$@" \
              2>"$tmp/backup.err") || {
        cat "$tmp/backup.err" >&2
        die "cbt backup $*: exit $?"
    }
}
field() { jq -r ".$1" <<<"$summary"; }
objects() { cbt s3 ls "$repo/" | awk '{ print $2 }' | sort; }

# Point 1: 90 MiB of data, more than the 64 MiB first chunk.
io -c 'write -P 0x11 0 40M' -c 'write -P 0x22 60M 50M' -c 'write -P 0x33 159M 1M'
backup
[ "$(field kind)" = full ] || die "first backup is not full: $summary"
[ "$(field checksum)" = sha256 ] || die "an S3 backup should default to sha256: $summary"
cp --sparse=always "$disk" "$tmp/point1.raw"
files=("$(field file)")
[ "$(field '"file-size"')" -gt $((64 << 20)) ] || die "the full backup is too small: $summary"

# Points 2 and 3: incrementals.
io -c 'write -P 0x44 4k 4k' -c 'write -z 60M 128k' -c 'write -P 0x55 120M 2M'
backup --incremental
[ "$(field kind)" = incremental ] || die "second backup not incremental: $summary"
cp --sparse=always "$disk" "$tmp/point2.raw"
files+=("$(field file)")
io -c 'discard 0 1M' -c 'write -P 0x66 100M 8M'
backup --incremental
cp --sparse=always "$disk" "$tmp/point3.raw"
files+=("$(field file)")

list=$(cbt list --repo "$repo" --json)
[ "$(jq -c '[.count, .chains]' <<<"$list")" = "[3,1]" ] || die "list: $list"
[ "$(jq -r '[.backups[].file] | join(" ")' <<<"$list")" = "${files[*]}" ] ||
    die "list shows other files: $list"
cbt list --repo "$repo" | grep -q "chain 1:" || die "list without chains"

# The objects are the qcow2 files: download, check, compare.
mkdir "$tmp/dl"
for f in "${files[@]}"; do
    cbt s3 get "$repo/$f" "$tmp/dl/$f" || die "cannot download $f"
    qemu-img check -q "$tmp/dl/$f" || die "$f: qemu-img check failed"
done
qemu-img compare -q -f qcow2 -F raw "$tmp/dl/${files[0]}" "$tmp/point1.raw" ||
    die "the downloaded full backup differs from the image"
qemu-img compare -q -f qcow2 -F raw "$tmp/dl/${files[2]}" "$tmp/point3.raw" ||
    die "the downloaded chain differs from the image at point 3"

# Every point restores from S3.
for n in 1 2 3; do
    cbt restore --repo "$repo" --at $n --output "$tmp/r$n.raw" 2>/dev/null ||
        die "restore of point $n from S3 failed"
    cmp "$tmp/r$n.raw" "$tmp/point$n.raw" || die "restore of point $n differs"
    rm -f "$tmp/r$n.raw"
done
cbt verify --repo "$repo" >/dev/null 2>&1 || die "verify of the S3 repository failed"
[ -z "$(cbt s3 uploads "$repo/")" ] || die "uploads left: $(cbt s3 uploads "$repo/")"
objects | grep -qx 'vm1/lock' && die "the lock object was left behind"

# Errors: one line naming the cause, exit 1, nothing changed.
cbt s3 get "$repo/manifest.json" "$tmp/manifest.before"
objects >"$tmp/objects.before"
io -c 'write -P 0x77 2M 1M'
unchanged()
{
    cbt s3 get "$repo/manifest.json" "$tmp/manifest.after"
    cmp -s "$tmp/manifest.before" "$tmp/manifest.after" || die "$1: the manifest changed"
    objects | cmp -s - "$tmp/objects.before" || die "$1: the objects changed: $(objects)"
    no_checkpoint "$1"
}
expect_rc 1 env AWS_SECRET_ACCESS_KEY=wrong-secret-key "$CBT_CLI" backup \
    --socket "$dsock" --control "$csock" --repo "$repo"
has "the secret key does not match the access key"
[ "$(grep -c 'cbt:' <<<"$out")" -eq 1 ] || die "more than one line for a wrong key: $out"
unchanged "wrong secret key"
expect_rc 1 cbt backup --socket "$dsock" --control "$csock" --repo s3://no-such-bucket/vm1
has "no such bucket"
no_checkpoint "missing bucket"
down=$(free_tcp_port)
expect_rc 1 env AWS_MAX_ATTEMPTS=2 "$CBT_CLI" backup --socket "$dsock" --control "$csock" \
    --repo "$repo" --s3-endpoint "http://127.0.0.1:$down"
has "cannot connect to http://127.0.0.1:$down"
unchanged "endpoint down"

# Retention: a second chain, then keep 1: the first chain goes whole.
# ... streamed, not staged: the backup writes (next to) nothing to local
# disk, and its memory stays bounded (64 MiB held for the header, a few
# 8 MiB parts, the NBD buffers).
"$PYTHON" - "$tmp/usage" "$CBT_CLI" backup --socket "$dsock" --control "$csock" \
    --repo "$repo" --json --full --checksum xxh128 >"$tmp/full2.json" \
    2>"$tmp/backup.err" <<'PYEOF' ||
import resource, subprocess, sys
rc = subprocess.run(sys.argv[2:]).returncode
u = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write("%d %d\n" % (u.ru_oublock, u.ru_maxrss))
sys.exit(rc)
PYEOF
    die "second full backup failed: $(cat "$tmp/backup.err")"
summary=$(cat "$tmp/full2.json")
read -r oblocks maxrss <"$tmp/usage"
echo "full backup to S3: $((oblocks / 2)) KiB written to local disk, peak RSS $((maxrss >> 10)) MiB" >&2
[ "$(field '"file-size"')" -gt $((90 << 20)) ] || die "the second full backup is small: $summary"
[ "$(field checksum)" = xxh128 ] || die "--checksum xxh128 was not used: $summary"
[ "$oblocks" -lt 2048 ] ||
    die "the backup to S3 wrote $((oblocks / 2)) KiB to local disk (a staging copy?)"
[ "$maxrss" -lt $((400 << 10)) ] || die "the backup to S3 used $((maxrss >> 10)) MiB of memory"
files2=("$(field file)")
io -c 'write -P 0x88 30M 1M'
backup
files2+=("$(field file)")
cp --sparse=always "$disk" "$tmp/point5.raw"
cbt prune --repo "$repo" --keep-chains 1 --dry-run >"$tmp/dry" || die "prune --dry-run failed"
grep -q "would prune 1 of 2 chains (3 backups)" "$tmp/dry" || die "dry run: $(cat "$tmp/dry")"
[ "$(cbt list --repo "$repo" --json | jq .count)" = 5 ] || die "--dry-run pruned"
cbt prune --repo "$repo" --keep-chains 1 >"$tmp/prune" || die "prune failed"
[ "$(cbt list --repo "$repo" --json | jq -c '[.count, .chains]')" = "[2,1]" ] ||
    die "after prune: $(cbt list --repo "$repo")"
for f in "${files[@]}"; do
    objects | grep -qx "vm1/$f" && die "$f of the pruned chain is still there"
done
for f in "${files2[@]}"; do
    objects | grep -qx "vm1/$f" || die "$f of the kept chain is gone"
done
cbt restore --repo "$repo" --output "$tmp/r5.raw" 2>/dev/null || die "restore after prune"
cmp "$tmp/r5.raw" "$tmp/point5.raw" || die "restore after prune differs"
[ "$(cbt list --repo "$repo" --json | jq -c '[.backups[].checksum]')" = \
  '["xxh128","sha256"]' ] || die "the kept chain should mix xxh128 and sha256"
cbt verify --repo "$repo" >/dev/null 2>&1 || die "verify of the mixed S3 chain failed"

# Leftovers of runs that did not finish, cleaned by the next writer under
# the lock: an unlisted object older than every listed one (a prune that
# did not get to delete it), one newer than next-seq (a backup that did
# not get to list it), an incomplete multipart upload (a killed backup);
# objects that are no backup files are left alone.
head -c 6M /dev/urandom >"$tmp/junk"
cbt s3 put "$tmp/junk" "$repo/000002-inc-20200101T000000Z.qcow2" >/dev/null
cbt s3 put "$tmp/junk" "$repo/000099-full-20300101T000000Z.qcow2" >/dev/null
cbt s3 put "$tmp/junk" "$repo/notes.txt" >/dev/null
cbt s3 put --no-complete "$tmp/junk" "$repo/000100-full-20300101T000000Z.qcow2" >/dev/null
[ -n "$(cbt s3 uploads "$repo/")" ] || die "no incomplete upload to clean"

# The nightly job against the S3 repository: two more chains, keep 2.
export CBT=$CBT_CLI CBT_REPO=$repo CBT_CONTROL=$csock CBT_SOCKET=$dsock
export CBT_LOG=$tmp/nightly.log KEEP_CHAINS=2 CBT_NIGHTLY_LOCK=$tmp/nightly.lock
CBT_BACKUP_ARGS=--full bash "$CBT_SOURCE_DIR/cbt/cbt-nightly.sh" || die "nightly 1 failed"
for w in "000002-inc-20200101T000000Z.qcow2: removed (pruned from the manifest by a prune that did not finish)" \
         "000099-full-20300101T000000Z.qcow2: removed (finished but never entered in the manifest)" \
         "000100-full-20300101T000000Z.qcow2: aborted an upload left by a backup that did not finish"; do
    grep -qF "$w" "$CBT_LOG" || die "not in the nightly log: $w: $(cat "$CBT_LOG")"
done
[ -z "$(cbt s3 uploads "$repo/")" ] || die "uploads left: $(cbt s3 uploads "$repo/")"
objects | grep -qx "vm1/notes.txt" || die "an object that is no backup file was removed"
cbt s3 rm "$repo/notes.txt"
grep -q "2 chains, keeping up to 2: nothing to prune" "$CBT_LOG" ||
    die "nightly 1 log: $(cat "$CBT_LOG")"
CBT_BACKUP_ARGS=--full bash "$CBT_SOURCE_DIR/cbt/cbt-nightly.sh" || die "nightly 2 failed"
for f in "${files2[@]}"; do
    grep -q "pruned $f" "$CBT_LOG" || die "nightly did not log pruning $f: $(cat "$CBT_LOG")"
done
grep -qE 'cbt-nightly\[[0-9]+\]: pruned 1 of 3 chains \(KEEP_CHAINS=2\)' "$CBT_LOG" ||
    die "no prune summary in the nightly log: $(cat "$CBT_LOG")"
[ "$(cbt list --repo "$repo" --json | jq -c '[.count, .chains]')" = "[2,2]" ] ||
    die "after the nightly runs: $(cbt list --repo "$repo")"
exit 0
