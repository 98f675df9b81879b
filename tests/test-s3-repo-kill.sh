#!/usr/bin/env bash
# radosgw killed (SIGKILL) in the middle of a full backup into an S3
# repository on a real Ceph RGW (tests/ceph-rgw.sh):
#   - cbt backup exits 1 naming the S3 failure, the daemon's checkpoint is
#     aborted (none in progress, the changes merged back), and once
#     radosgw is back `cbt list` shows only the earlier point: the killed
#     backup's multipart upload is invisible;
#   - the next backup aborts the upload left behind, takes over the lock
#     the failed run could not release (its process is gone), succeeds
#     (incremental: the aborted checkpoint's changes are in it), and its
#     object is complete: downloaded with `cbt s3 get` with its backing
#     file it passes qemu-img check and qemu-img compare finds the chain
#     equal to the image;
#     cbt restore from the repository gives the image byte for byte.

source "$(dirname "$0")/functions.sh"
# shellcheck source=tests/ceph-rgw.sh
source "$testsdir/ceph-rgw.sh"
requires ceph-mon ceph-mgr ceph-osd radosgw radosgw-admin monmaptool osdmaptool \
    curl cmp qemu-io qemu-img jq

ceph_rgw_start "$tmp/ceph" || die "the Ceph cluster did not come up (see above)"
bucket=s3://cbt-kill
repo=$bucket/vm
cbt s3 mb "$bucket" || die "cannot create the bucket"
# Fewer tries, so the run fails within seconds once radosgw is gone.
export AWS_MAX_ATTEMPTS=3

disk=$tmp/disk.img
csock=$tmp/ctl.sock
truncate -s 1G "$disk"
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --control "$csock"
dsock=$sock
dpid=$pid
io() { qio -f raw "$uri" "$@"; }
status_json() { ctl "$csock" '{"execute":"status"}'; }

# The earlier point: a small full backup.
io -c 'write -P 0x11 0 1M'
cbt backup --socket "$dsock" --control "$csock" --repo "$repo" >/dev/null 2>&1 ||
    die "the first backup failed"
first=$(cbt list --repo "$repo" --json | jq -r '.backups[0].file')

# A large full backup, and radosgw killed once its upload is under way
# (an upload is listed once its first streamed part went out).
io -c 'write -P 0x22 0 300M' -c 'write -P 0x33 400M 300M'
"$CBT_CLI" backup --socket "$dsock" --control "$csock" --repo "$repo" --full \
    --connections 1 >"$tmp/kill.out" 2>"$tmp/kill.err" &
bpid=$!
cleanup_fn _kill_quietly "$bpid"
for (( i = 0; i < 600; i++ )); do
    [ -n "$(cbt s3 uploads "$repo/" 2>/dev/null)" ] && break
    kill -0 "$bpid" 2>/dev/null || die "the backup ended before its upload was seen: $(cat "$tmp/kill.err")"
    sleep 0.05
done
[ -n "$(cbt s3 uploads "$repo/" 2>/dev/null)" ] || die "no upload under way after 30 s"
# Hold the backup where it is (its reads wait for the stopped daemon), so
# radosgw dies in the middle of it however fast the machine is.
kill -STOP "$dpid"
cleanup_fn kill -CONT "$dpid"
ceph_rgw_stop_rgw "$tmp/ceph"
kill -CONT "$dpid"
rc=0
wait "$bpid" || rc=$?
[ "$rc" -eq 1 ] || die "backup with radosgw killed: exit $rc, expected 1: $(cat "$tmp/kill.err")"
grep -qE "cannot connect|Connection refused|connection|reset" "$tmp/kill.err" ||
    die "the failure does not name the cause: $(cat "$tmp/kill.err")"
grep -q "checkpoint .* aborted" "$tmp/kill.err" ||
    die "the checkpoint was not aborted: $(cat "$tmp/kill.err")"
st=$(status_json)
jq -e '.return.checkpoint == null' <<<"$st" >/dev/null || die "checkpoint in progress: $st"

# radosgw back: only the earlier point is listed; the upload is left.
ceph_rgw_start_rgw "$tmp/ceph" || die "radosgw did not come back"
list=$(cbt list --repo "$repo" --json)
[ "$(jq -r '[.backups[].file] | join(" ")' <<<"$list")" = "$first" ] ||
    die "after the killed backup the list is: $list"
[ -n "$(cbt s3 uploads "$repo/")" ] || die "the killed run's upload is not listed"

# The next backup cleans up and succeeds.
summary=$(cbt backup --socket "$dsock" --control "$csock" --repo "$repo" --json \
          2>"$tmp/next.err") || die "the backup after restarting radosgw failed: $(cat "$tmp/next.err")"
grep -q "aborted an upload left by a backup that did not finish" "$tmp/next.err" ||
    die "the leftover upload was not aborted: $(cat "$tmp/next.err")"
grep -q "took over a lock that a dead process on this host left" "$tmp/next.err" ||
    die "the lock of the failed run was not taken over: $(cat "$tmp/next.err")"
[ -z "$(cbt s3 uploads "$repo/")" ] || die "uploads left: $(cbt s3 uploads "$repo/")"
file=$(jq -r .file <<<"$summary")
# Incremental: the aborted checkpoint's changes merged back into the
# bitmap, so this backup holds all 600 MiB written since the first.
[ "$(jq -r .kind <<<"$summary")" = incremental ] || die "not incremental: $summary"
[ "$(jq -r '."bytes-copied"' <<<"$summary")" -ge $((600 << 20)) ] ||
    die "the changes of the aborted checkpoint are missing: $summary"
[ "$(cbt list --repo "$repo" --json | jq .count)" = 2 ] || die "list: $(cbt list --repo "$repo")"
mkdir "$tmp/dl"
for f in "$first" "$file"; do
    cbt s3 get "$repo/$f" "$tmp/dl/$f" || die "cannot download $f"
done
[ "$(stat -c %s "$tmp/dl/$file")" = "$(jq -r '."file-size"' <<<"$summary")" ] ||
    die "the object's size is not the manifest's"
qemu-img check -q "$tmp/dl/$file" || die "$file: qemu-img check failed"
qemu-img compare -q -f qcow2 -F raw "$tmp/dl/$file" "$disk" ||
    die "the backup after the kill differs from the image"
cbt restore --repo "$repo" --output "$tmp/r.raw" 2>/dev/null || die "restore failed"
cmp "$tmp/r.raw" "$disk" || die "restore differs from the image"
exit 0
