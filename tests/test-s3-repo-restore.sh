#!/usr/bin/env bash
# Reading a repository on S3 (issue 15): restore, verify, mount and
# instant restore with --repo s3://BUCKET/PREFIX against a real Ceph RADOS
# Gateway (tests/ceph-rgw.sh).
#
# The repository: a full backup and two incrementals of a 64 MiB disk
# served by the real daemon, made into a directory and uploaded under a
# prefix with `cbt s3 put` (the layout is the directory's: the qcow2
# files, then manifest.json); the disk is copied after each backup as the
# reference of that point.  A second repository under another prefix is
# written by `cbt backup --repo s3://` itself: a full and an incremental.
#   - cbt restore --repo s3:// of every point, to a raw file, a qcow2 file
#     and an NBD export: equal to the disk at that point (cmp);
#     --s3-endpoint instead of AWS_ENDPOINT_URL works the same;
#   - cbt verify --repo s3://: OK;
#   - both points of the repository cbt backup wrote restore equal and
#     verify OK;
#   - cbt mount --repo s3:// of the middle point: MOUNTPOINT/disk.raw
#     equal to the disk at that point, SEEK_DATA/SEEK_HOLE as the chain;
#   - cbt restore --instant --repo s3://: serves at once; killed (-9)
#     while copying, its private FUSE mount of the point goes too, and
#     the same command resumes; it reaches standalone (complete, the
#     mount gone) and the output equals the disk at that point;
#   - the same of a point whose disk begins with the qcow2 magic, into
#     a raw output: equal (the daemon is told its source is raw);
#   - cbt serve --repo s3://: the export equals the point; the private
#     mount is gone when the daemon has exited;
#   - a byte flipped in the full backup's object (a modified copy
#     uploaded over it): a mount made before never serves the new bytes
#     (what it checked at start and holds in its cache, or EIO for what it
#     must fetch again, the log naming the replaced object); restore exits 4
#     naming the object and the byte
#     range of the bad chunk, and leaves no output; verify exits 4 naming
#     it too;
#   - the full backup's object deleted: restore, verify, mount and
#     instant restore exit 4 saying which object is missing; one of
#     another size than the manifest's: restore and verify exit 4 naming
#     both sizes.
#
# Set CBT_S3_TEST_ENV=DIR/env (written by `tests/ceph-rgw.sh start DIR`)
# to use a cluster that is already running instead of starting one.

source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img nbdcopy cmp jq
export CBT_FILTERD

if [ -n "${CBT_S3_TEST_ENV:-}" ]; then
    set -a
    # shellcheck disable=SC1090
    . "$CBT_S3_TEST_ENV"
    set +a
else
    # shellcheck source=tests/ceph-rgw.sh
    source "$testsdir/ceph-rgw.sh"
    requires ceph-mon ceph-mgr ceph-osd radosgw radosgw-admin monmaptool osdmaptool curl
    ceph_rgw_start "$tmp/ceph" || die "the Ceph cluster did not come up (see above)"
fi

bucket=cbt-read-$$-$RANDOM
s3repo=s3://$bucket/vm1
cbt s3 mb "s3://$bucket" || die "cbt s3 mb s3://$bucket"

# ---- a full and two incrementals, uploaded -------------------------------

disk=$tmp/disk.img
repo=$tmp/repo
csock=$tmp/ctl.sock
size=$((64 << 20))
truncate -s $size "$disk"
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --control "$csock"
dsock=$sock
dpid=$pid

io() { qio -f raw "$uri" "$@"; }
backup()
{
    cbt backup --socket "$dsock" --control "$csock" --repo "$repo" "$@" >/dev/null \
        2>"$tmp/backup.err" || { cat "$tmp/backup.err" >&2; die "cbt backup $*: failed"; }
}

# Point 1: data in half of every MiB, a pattern per MiB.
args=()
for (( i = 0; i < 64; i++ )); do
    args+=(-c "write -P $((0x10 + i)) ${i}M 512k")
done
io "${args[@]}"
backup --full
cp --sparse=always "$disk" "$tmp/point1.img"
# Point 2: new data, zeroed and discarded ranges.
io -c 'write -P 0xc1 100k 300k' -c 'write -z 8M 128k' -c 'discard 20M 1M' \
   -c 'write -P 0xc2 40M 3M' -c 'write -P 0xc3 63M 1M'
backup --incremental
cp --sparse=always "$disk" "$tmp/point2.img"
# Point 3: a little more.
io -c 'write -P 0xd1 5M 64k' -c 'write -P 0xd2 33M 2M' -c 'write -z 41M 1M'
backup --incremental
cp --sparse=always "$disk" "$tmp/point3.img"
# The same disk backed up by cbt backup straight into S3 (another prefix):
# a full of point 3, and an incremental of a point 4.
s3repo2=s3://$bucket/vm2
cbt backup --socket "$dsock" --control "$csock" --repo "$s3repo2" --full >/dev/null \
    2>"$tmp/backup.err" || { cat "$tmp/backup.err" >&2; die "cbt backup --full to S3 failed"; }
# Point 4 begins with the qcow2 magic: a disk may hold anything.
printf 'QFI\xfb' >"$tmp/magic"
io -c 'write -P 0xe1 1M 3M' -c 'write -z 30M 2M' -c 'write -P 0xe2 62M 64k' \
   -c "write -s $tmp/magic 0 4"
cbt backup --socket "$dsock" --control "$csock" --repo "$s3repo2" --incremental >/dev/null \
    2>"$tmp/backup.err" || { cat "$tmp/backup.err" >&2; die "cbt backup --incremental to S3 failed"; }
cp --sparse=always "$disk" "$tmp/point4.img"
stop_filterd "$dpid"

# The layout is the directory's: the backup files first, the manifest last.
cbt s3 put --jobs 4 "$repo"/*.qcow2 "$s3repo/" >/dev/null || die "uploading the backups"
cbt s3 put "$repo/manifest.json" "$s3repo/manifest.json" >/dev/null ||
    die "uploading the manifest"
files=()
while read -r f; do files+=("$f"); done < <(jq -r '.backups[].file' "$repo/manifest.json")
[ ${#files[@]} -eq 3 ] || die "expected 3 backups, the manifest has ${#files[@]}"

# ---- restore and verify ---------------------------------------------------

for p in 1 2 3; do
    cbt restore --repo "$s3repo" --at $p --output "$tmp/r$p.raw" 2>"$tmp/restore.err" || {
        cat "$tmp/restore.err" >&2
        die "restore --at $p from S3 failed"
    }
    cmp "$tmp/point$p.img" "$tmp/r$p.raw" || die "restore --at $p from S3 differs"
done
cbt restore --repo "$s3repo" --at 2 --output "$tmp/r2.qcow2" 2>/dev/null ||
    die "restore --at 2 to qcow2 from S3 failed"
qemu-img compare -f qcow2 -F raw "$tmp/r2.qcow2" "$tmp/point2.img" >/dev/null ||
    die "restore --at 2 to qcow2 from S3 differs"

# Into an NBD export (old data in it: the zero ranges must be written).
head -c $size /dev/urandom >"$tmp/target.img"
start_filterd --image "$tmp/target.img"
tpid=$pid
cbt restore --repo "$s3repo" --at 3 --output "$uri" 2>/dev/null ||
    die "restore --at 3 from S3 into NBD failed"
stop_filterd "$tpid"
cmp "$tmp/point3.img" "$tmp/target.img" || die "restore --at 3 from S3 into NBD differs"

# What cbt backup wrote to S3 reads back the same.
for p in 1 2; do
    cbt restore --repo "$s3repo2" --at $p --output "$tmp/v$p.raw" 2>/dev/null ||
        die "restore --at $p of $s3repo2 failed"
    cmp "$tmp/point$((p + 2)).img" "$tmp/v$p.raw" || die "restore --at $p of $s3repo2 differs"
done
expect_rc 0 cbt verify --repo "$s3repo2"
has "2 backups"

# --s3-endpoint rather than the environment.
(
    ep=$AWS_ENDPOINT_URL
    unset AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3
    cbt restore --repo "$s3repo" --s3-endpoint "$ep" --at 1 --output "$tmp/r1e.raw" \
        2>/dev/null
) || die "restore with --s3-endpoint failed"
cmp "$tmp/point1.img" "$tmp/r1e.raw" || die "restore with --s3-endpoint differs"

expect_rc 0 cbt verify --repo "$s3repo"
has "3 backups"
has "all checksums and chains OK"

# ---- cbt mount ------------------------------------------------------------

requires fusermount3
[ -w /dev/fuse ] || skip "no /dev/fuse"
mnt=$tmp/mnt
mkdir "$mnt"
cbt mount --repo "$s3repo" --at 2 "$mnt" >"$tmp/mount.log" 2>&1 &
mpid=$!
_daemon_log[$mpid]=$tmp/mount.log
cleanup_fn _kill_daemon "$mpid"
cleanup_fn fusermount3 -u -q "$mnt"
for (( i = 0; i < 300; i++ )); do
    [ -f "$mnt/disk.raw" ] && break
    kill -0 $mpid 2>/dev/null || { cat "$tmp/mount.log" >&2; die "cbt mount exited"; }
    sleep 0.1
done
[ -f "$mnt/disk.raw" ] || die "cbt mount: no $mnt/disk.raw after 30 s"
[ "$(stat -c %s "$mnt/disk.raw")" = $size ] || die "disk.raw has the wrong size"
cmp "$tmp/point2.img" "$mnt/disk.raw" || die "mounted point 2 from S3 differs"
# Holes as the chain has them: each MiB is 512 KiB of data, then a hole.
holes=$("$PYTHON" -c '
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print(os.lseek(fd, 0, os.SEEK_HOLE), os.lseek(fd, 524288, os.SEEK_DATA))' "$mnt/disk.raw")
[ "$holes" = "524288 1048576" ] || die "SEEK_HOLE/SEEK_DATA on the S3 mount: $holes"
cbt umount "$mnt" || die "cbt umount $mnt"
wait $mpid || die "cbt mount exited with $?"

# ---- cbt restore --instant ------------------------------------------------

out=$tmp/instant.qcow2
isock=$tmp/instant.sock
ictl=$tmp/instant-ctl.sock
# instant LOG ARGS...: cbt restore --instant of point 2 in the background,
# waits (bounded) until it serves; sets $ipid.
instant()
{
    local ilog=$1 i
    shift
    rm -f "$tmp/instant.pid"
    "$CBT_CLI" restore --instant --repo "$s3repo" --at 2 --output "$out" --socket "$isock" \
        --control "$ictl" --pid-file "$tmp/instant.pid" "$@" >"$ilog" 2>&1 &
    ipid=$!
    _daemon_log[$ipid]=$ilog
    cleanup_fn _kill_daemon "$ipid"
    for (( i = 0; i < 600; i++ )); do
        [ -s "$tmp/instant.pid" ] && [ -S "$isock" ] && return 0
        kill -0 $ipid 2>/dev/null || { cat "$ilog" >&2; die "instant restore exited"; }
        sleep 0.1
    done
    die "instant restore: no socket after 60 s"
}
# private_mount LOG: the private mount of the point the daemon reads.
private_mount() { sed -n 's|.*instant restore of \(.*\)/disk.raw into.*|\1|p' "$1" | head -1; }
# gone MOUNTPOINT: wait (bounded) until it is unmounted and removed.
gone()
{
    local i
    for (( i = 0; i < 100; i++ )); do
        grep -qF " $1 " /proc/mounts || [ -e "$1" ] || return 0
        sleep 0.1
    done
    grep -qF " $1 " /proc/mounts && die "$1 still mounted"
    die "$1 not removed"
}

# Slowed down and killed: the mount goes with the daemon, and the same
# command resumes (the source's identity, the mount's inode number, is
# the same for the same object).
instant "$tmp/instant0.log" --rate 1M
pmnt=$(private_mount "$tmp/instant0.log")
[ -n "$pmnt" ] || { cat "$tmp/instant0.log" >&2; die "no private mount named in the log"; }
grep -qF " $pmnt " /proc/mounts || die "$pmnt is not mounted while the daemon runs"
sleep 1
kill -KILL $ipid
wait $ipid 2>/dev/null || true
gone "$pmnt"
instant "$tmp/instant.log"
grep -q "resuming the instant restore" "$tmp/instant.log" ||
    { cat "$tmp/instant.log" >&2; die "the second run did not resume"; }
[ -S "$isock" ] || die "instant restore: no socket after 60 s"
nbdcopy "nbd+unix:///?socket=$isock" "$tmp/instant-served.raw" ||
    die "nbdcopy of the instant restore failed"
cmp "$tmp/point2.img" "$tmp/instant-served.raw" || die "instant restore serves other data"
for (( i = 0; i < 600; i++ )); do
    st=$(ctl "$ictl" '{"execute":"status"}' | jq -c '.return.restore')
    json_true '.complete and (."source-open" | not)' "$st" && break
    json_true '.failed == null' "$st" || die "instant restore failed: $st"
    sleep 0.1
done
json_true '.complete' "$st" || die "instant restore not complete after 60 s: $st"
# The private mount of the point ends with the copy.
pmnt=$(private_mount "$tmp/instant.log")
[ -n "$pmnt" ] || die "no private mount named in the log"
gone "$pmnt"
stop_filterd "$ipid"
qemu-img compare -f qcow2 -F raw "$out" "$tmp/point2.img" >/dev/null ||
    die "the instant restore's output differs from point 2"

# A point whose disk begins with the qcow2 magic, into a raw output: the
# daemon is told the source is raw, it does not guess.
rm -f "$tmp/instant.pid"
"$CBT_CLI" restore --instant --repo "$s3repo2" --at 2 --output "$tmp/instant4.raw" \
    --socket "$tmp/instant4.sock" --control "$tmp/instant4-ctl.sock" \
    --pid-file "$tmp/instant.pid" >"$tmp/instant4.log" 2>&1 &
ipid=$!
_daemon_log[$ipid]=$tmp/instant4.log
cleanup_fn _kill_daemon "$ipid"
for (( i = 0; i < 600; i++ )); do
    st=$(ctl "$tmp/instant4-ctl.sock" '{"execute":"status"}' 2>/dev/null |
         jq -c '.return.restore' 2>/dev/null) || st=
    [ -n "$st" ] && json_true '.complete and (."source-open" | not)' "$st" && break
    kill -0 $ipid 2>/dev/null || { cat "$tmp/instant4.log" >&2; die "instant restore exited"; }
    sleep 0.1
done
json_true '.complete' "$st" || die "instant restore of point 4 not complete after 60 s: $st"
gone "$(private_mount "$tmp/instant4.log")"
stop_filterd "$ipid"
cmp "$tmp/point4.img" "$tmp/instant4.raw" || die "the instant restore of point 4 differs"

# ---- cbt serve --------------------------------------------------------------

"$CBT_CLI" serve --repo "$s3repo" --at 1 --socket "$tmp/serve.sock" \
    --pid-file "$tmp/serve.pid" >"$tmp/serve.log" 2>&1 &
spid=$!
_daemon_log[$spid]=$tmp/serve.log
cleanup_fn _kill_daemon "$spid"
for (( i = 0; i < 600; i++ )); do
    [ -s "$tmp/serve.pid" ] && [ -S "$tmp/serve.sock" ] && break
    kill -0 $spid 2>/dev/null || { cat "$tmp/serve.log" >&2; die "cbt serve exited"; }
    sleep 0.1
done
nbdcopy "nbd+unix:///?socket=$tmp/serve.sock" "$tmp/served.raw" || die "nbdcopy of cbt serve"
cmp "$tmp/point1.img" "$tmp/served.raw" || die "cbt serve of point 1 from S3 differs"
smnt=$(sed -n 's|.*serving \(/.*\)/disk.raw (raw.*|\1|p' "$tmp/serve.log" | head -1)
[ -n "$smnt" ] || { cat "$tmp/serve.log" >&2; die "no private mount named in the log"; }
stop_filterd "$spid"
gone "$smnt"

# ---- damage ---------------------------------------------------------------

full=${files[0]}
key=$s3repo/$full
cp "$repo/$full" "$tmp/bad.qcow2"
# A data byte of the full backup (its first guest cluster, after the header).
printf '\x5a' | dd of="$tmp/bad.qcow2" bs=1 seek=$((65536 + 1000)) conv=notrunc status=none
cmp -s "$repo/$full" "$tmp/bad.qcow2" && die "the byte flipped nothing"
# A mount made before the object is replaced refuses to mix versions:
# what it had not read yet fails with EIO, and the log says why.
cbt mount --repo "$s3repo" --at 1 "$mnt" >"$tmp/mount2.log" 2>&1 &
mpid=$!
_daemon_log[$mpid]=$tmp/mount2.log
cleanup_fn _kill_daemon "$mpid"
for (( i = 0; i < 300; i++ )); do
    [ -f "$mnt/disk.raw" ] && break
    kill -0 $mpid 2>/dev/null || { cat "$tmp/mount2.log" >&2; die "cbt mount exited"; }
    sleep 0.1
done
cbt s3 put "$tmp/bad.qcow2" "$key" >/dev/null || die "uploading the damaged copy"
# The mount checked (and cached) the chunks it read when it started, so
# the changed byte's cluster may come from its cache: then it must be the
# bytes it checked; fetched again, it must fail on the new ETag.
g=$("$PYTHON" -c 'import chunkmap, sys; print(chunkmap.Map(sys.argv[1]).guest_of(int(sys.argv[2])) // 65536 * 65536)' \
        "$tmp/bad.qcow2" $((65536 + 1000)))
if dd if="$mnt/disk.raw" of="$tmp/cluster.bin" bs=64k skip=$((g / 65536)) count=1 \
      status=none 2>/dev/null; then
    cmp -s "$tmp/cluster.bin" <(dd if="$tmp/point1.img" bs=64k skip=$((g / 65536)) count=1 \
                                  status=none) ||
        die "the mount served the replaced object's bytes"
else
    grep -qF "$key: replaced while being read" "$tmp/mount2.log" ||
        { cat "$tmp/mount2.log" >&2; die "the mount's log does not name the replaced object"; }
fi
cbt umount "$mnt" || die "cbt umount $mnt"
wait $mpid || die "cbt mount exited with $?"
expect_rc 4 cbt restore --repo "$s3repo" --at 3 --output "$tmp/bad.raw"
has "$key: checksum mismatch in bytes 0.."
has "not restoring ${files[2]}"
[ ! -e "$tmp/bad.raw" ] || die "a failed restore left its output"
expect_rc 4 cbt verify --repo "$s3repo"
has "$key: checksum mismatch in bytes 0.."
cbt s3 put "$repo/$full" "$key" >/dev/null || die "uploading the good copy again"
cbt verify --repo "$s3repo" >/dev/null 2>&1 || die "verify after the repair failed"

# A missing object.
cbt s3 rm "$key" || die "cbt s3 rm $key"
expect_rc 4 cbt restore --repo "$s3repo" --at 2 --output "$tmp/missing.raw"
has "$key: missing (listed in the manifest as backup 1)"
[ ! -e "$tmp/missing.raw" ] || die "a failed restore left its output"
expect_rc 4 cbt verify --repo "$s3repo"
has "$key: missing (listed in the manifest as backup 1)"
expect_rc 4 cbt mount --repo "$s3repo" --at 1 "$mnt"
has "$key: missing"
expect_rc 4 "$CBT_CLI" restore --instant --repo "$s3repo" --at 1 --output "$tmp/mi.raw" \
    --socket "$tmp/mi.sock"
has "$key: missing"
[ ! -e "$tmp/mi.raw" ] || die "a failed instant restore left its output"

# An object of another size than the manifest's.
head -c -65536 "$repo/$full" >"$tmp/short.qcow2"
cbt s3 put "$tmp/short.qcow2" "$key" >/dev/null || die "uploading a short copy"
expect_rc 4 cbt restore --repo "$s3repo" --at 2 --output "$tmp/short.raw"
has "$key: $(stat -c %s "$tmp/short.qcow2") bytes, the manifest says $(stat -c %s "$repo/$full")"
[ ! -e "$tmp/short.raw" ] || die "a failed restore left its output"
expect_rc 4 cbt verify --repo "$s3repo"
has "$key: $(stat -c %s "$tmp/short.qcow2") bytes, the manifest says"
