#!/usr/bin/env bash
# S3 listings that carry keys outside the prefix asked for.  A repository
# s3://BUCKET/vm owns the keys under vm/ only; cbt lists them (ListObjectsV2
# and ListMultipartUploads with prefix=vm/) to clean up after killed runs
# and to mention unlisted objects in verify.  A server, or anything
# between, that answers with other keys must not make cbt delete, abort or
# count them, nor read past a key shorter than the prefix.
#
# A real Ceph RGW (tests/ceph-rgw.sh) behind tests/s3-fault-proxy.py,
# whose "inject" rule adds keys to every listing answer and which logs
# every DELETE.  Real objects and an incomplete upload are made outside
# the prefix (zz/..., and vm2/..., which shares "vm" but not "vm/"); the
# proxy injects them, and the short keys "x" and "vm", into the listings
# of the repository.  Then:
#   - cbt backup (whose clean-up lists both) succeeds, says it ignored
#     each foreign key, sends no DELETE outside vm/, and the foreign
#     objects (same bytes) and the foreign upload are still there;
#     a stale object and an incomplete upload inside vm/ are still
#     removed (the clean-up works and saw the injected answers);
#   - cbt verify succeeds, mentions no foreign key as an unlisted backup;
#   - cbt s3 ls and cbt s3 abort --all on the prefix show and abort
#     nothing outside it;
#   - no crash: in an ASan build a read past a short key aborts the run.

source "$(dirname "$0")/functions.sh"
# shellcheck source=tests/ceph-rgw.sh
source "$testsdir/ceph-rgw.sh"
requires ceph-mon ceph-mgr ceph-osd radosgw radosgw-admin monmaptool osdmaptool \
    curl cmp qemu-io jq

ceph_rgw_start "$tmp/ceph" || die "the Ceph cluster did not come up (see above)"
rgw=$AWS_ENDPOINT_URL
rgw_port=${rgw##*:}
ctlf=$tmp/proxy.rule
echo pass >"$ctlf"
"$PYTHON" "$testsdir/s3-fault-proxy.py" "$rgw_port" "$tmp/proxy.port" "$ctlf" \
    2>"$tmp/proxy.log" &
proxy=$!
cleanup_fn _kill_quietly "$proxy"
for (( i = 0; i < 300; i++ )); do
    [ -s "$tmp/proxy.port" ] && break
    kill -0 "$proxy" 2>/dev/null || die "the proxy did not start: $(cat "$tmp/proxy.log")"
    sleep 0.05
done
export AWS_ENDPOINT_URL=http://127.0.0.1:$(cat "$tmp/proxy.port")
# What the test itself looks at goes straight to the server.
direct() { AWS_ENDPOINT_URL=$rgw "$CBT_CLI" "$@"; }

b=cbt-foreign
bucket=s3://$b
repo=$bucket/vm
direct s3 mb "$bucket" || die "cannot create the bucket"

# Outside the prefix, for real: two objects named like stale backups and
# an incomplete upload.
foreign=zz/000099-full-20250101T000000Z.qcow2
sibling=vm2/000098-full-20250101T000000Z.qcow2
fupload=zz/000097-full-20250101T000000Z.qcow2
printf 'not the repository'"'"'s\n' >"$tmp/foreign"
direct s3 put "$tmp/foreign" "$bucket/$foreign" >/dev/null
direct s3 put "$tmp/foreign" "$bucket/$sibling" >/dev/null
fid=$(direct s3 put --no-complete "$tmp/foreign" "$bucket/$fupload" | awk '{ print $1 }')
[ -n "$fid" ] || die "no upload id for the foreign upload"
direct s3 uploads "$bucket/zz/" | grep -qF "$fid" || die "the foreign upload is not listed"

foreign_intact()
{
    local k
    for k in "$foreign" "$sibling"; do
        rm -f "$tmp/got"
        direct s3 get "$bucket/$k" "$tmp/got" 2>/dev/null || die "$1: $k was deleted"
        cmp -s "$tmp/foreign" "$tmp/got" || die "$1: $k was changed"
    done
    direct s3 uploads "$bucket/zz/" | grep -qF "$fid" ||
        die "$1: the upload of $fupload was aborted"
    # Every DELETE the proxy passed was of a key under vm/.
    if grep "DELETE " "$tmp/proxy.log" | grep -v "DELETE /$b/vm/"; then
        die "$1: DELETE outside the repository's prefix (above)"
    fi
}
no_crash()
{
    if grep -qE "AddressSanitizer|runtime error|heap-buffer-overflow" <<<"$out"; then
        echo "$out" >&2
        die "$1: sanitizer report (above)"
    fi
}
# ignored WHAT: $out notes each foreign key as outside the prefix.
ignored()
{
    local k
    for k in "$foreign" "$sibling" x vm; do
        grep -qF "s3://$b/$k: in a listing of s3://$b/vm/ but outside that prefix (ignored)" \
            <<<"$out" || {
            echo "$out" >&2
            die "$1: no note that $k was ignored"
        }
    done
}
inject="inject $foreign $sibling $fupload=$fid x vm"

disk=$tmp/disk.img
csock=$tmp/ctl.sock
truncate -s 64M "$disk"
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --control "$csock"
dsock=$sock
qio -f raw "$uri" -c 'write -P 0x11 0 8M'

# The first backup: its clean-up lists the (empty) repository.
echo "$inject" >"$ctlf"
expect_rc 0 cbt backup --socket "$dsock" --control "$csock" --repo "$repo" --full
no_crash "first backup"
grep -q "list-type=2.*-> injected" "$tmp/proxy.log" || die "nothing injected into LIST"
grep -q "uploads.*-> injected" "$tmp/proxy.log" || die "nothing injected into the uploads"
foreign_intact "first backup"
ignored "first backup"

# Leftovers inside the prefix are still cleaned up beside the foreign keys.
stale=000050-full-20250101T000000Z.qcow2
direct s3 put "$tmp/foreign" "$repo/$stale" >/dev/null
sid=$(direct s3 put --no-complete "$tmp/foreign" "$repo/000051-full-20250101T000000Z.qcow2" |
      awk '{ print $1 }')
qio -f raw "$uri" -c 'write -P 0x22 1M 1M'
expect_rc 0 cbt backup --socket "$dsock" --control "$csock" --repo "$repo"
no_crash "second backup"
foreign_intact "second backup"
ignored "second backup"
has "s3://$b/vm/$stale: removed"
has "s3://$b/vm/000051-full-20250101T000000Z.qcow2: aborted an upload"
direct s3 head "$repo/$stale" >/dev/null 2>&1 && die "the stale object in vm/ was not removed"
direct s3 uploads "$repo/" | grep -qF "$sid" && die "the stale upload in vm/ was not aborted"

# verify lists the prefix to mention unlisted objects: not foreign ones.
expect_rc 0 cbt verify --repo "$repo"
no_crash "verify"
ignored "verify"
grep "not listed in the manifest" <<<"$out" &&
    die "verify counted a foreign key as an unlisted object of the repository"
has "2 backups"

# The S3 commands on the prefix.
expect_rc 0 cbt s3 ls "$repo/"
no_crash "s3 ls"
grep -E " (zz/|vm2/|x$|vm$)" <<<"$out" && die "s3 ls shows keys outside vm/"
expect_rc 0 cbt s3 abort --all "$repo/"
no_crash "s3 abort --all"
foreign_intact "s3 abort --all"

echo pass >"$ctlf"
cbt restore --repo "$repo" --output "$tmp/r.raw" 2>/dev/null || die "restore failed"
cmp "$tmp/r.raw" "$disk" || die "the restore differs from the disk"
exit 0
