#!/usr/bin/env bash
# tests/ceph-rgw.sh itself, run by hand as a developer would: two clusters
# started at the same time in two directories come up on their own ports
# with their own fsid and data (a bucket made in one is unknown to the
# other), write nothing outside their directory (/etc/ceph, /var/lib/ceph,
# /var/log/ceph, /run/ceph stay as they were), and `stop` leaves no
# process behind, while the other cluster keeps serving.

source "$(dirname "$0")/functions.sh"
requires ceph-mon ceph-mgr ceph-osd radosgw radosgw-admin monmaptool osdmaptool curl

helper=$testsdir/ceph-rgw.sh
a=$tmp/a
b=$tmp/b
touch "$tmp/stamp"
# Whatever happens, no daemon outlives the test.
cleanup_fn bash "$helper" stop "$a"
cleanup_fn bash "$helper" stop "$b"

bash "$helper" start "$a" >"$tmp/a.out" 2>&1 &
pa=$!
bash "$helper" start "$b" >"$tmp/b.out" 2>&1 &
pb=$!
wait $pa || { cat "$tmp/a.out" >&2; die "start $a failed"; }
wait $pb || { cat "$tmp/b.out" >&2; die "start $b failed"; }
grep -qx "AWS_ENDPOINT_URL=http://127.0.0.1:[0-9]*" "$tmp/a.out" ||
    die "start did not print the endpoint: $(cat "$tmp/a.out")"
cmp -s "$tmp/a.out" "$a/env" || die "start printed something else than $a/env"

val() { sed -n "s/^$2=//p" "$1"; }
[ "$(val "$a/env" AWS_ENDPOINT_URL)" != "$(val "$b/env" AWS_ENDPOINT_URL)" ] ||
    die "both clusters on one endpoint"
fsid() { awk '$1 == "fsid" { print $3 }' "$1/ceph.conf"; }
[ -n "$(fsid "$a")" ] && [ "$(fsid "$a")" != "$(fsid "$b")" ] ||
    die "both clusters with one fsid"

# with_cluster DIR CMD...: CMD with the S3 variables of the cluster in DIR.
with_cluster() { (set -a; . "$1/env"; set +a; shift; "$@"); }
with_cluster "$a" cbt s3 mb s3://only-in-a
with_cluster "$a" cbt s3 ls s3://only-in-a/ >/dev/null || die "bucket missing in its own cluster"
expect_rc 1 with_cluster "$b" cbt s3 ls s3://only-in-a/
has "no such bucket (NoSuchBucket)"
# Each cluster's keys are its own.
expect_rc 1 env AWS_ACCESS_KEY_ID="$(val "$a/env" AWS_ACCESS_KEY_ID)" \
    AWS_SECRET_ACCESS_KEY="$(val "$a/env" AWS_SECRET_ACCESS_KEY)" \
    AWS_ENDPOINT_URL="$(val "$b/env" AWS_ENDPOINT_URL)" "$CBT_CLI" s3 ls s3://only-in-a/
has "InvalidAccessKeyId"

# Every daemon's files are in its directory.
for d in "$a" "$b"; do
    for f in mon.a osd.0 mgr.x client.rgw; do
        [ -S "$d/run/$f.asok" ] || die "no admin socket $d/run/$f.asok"
        [ -s "$d/log/$f.log" ] || die "no log $d/log/$f.log"
    done
done
changed=$(find /etc/ceph /var/lib/ceph /var/log/ceph /run/ceph -newer "$tmp/stamp" \
          2>/dev/null || true)
[ -z "$changed" ] || die "written outside the cluster directories: $changed"

# running DIR: PIDs of processes whose command line names DIR/ceph.conf.
running()
{
    local p
    for p in /proc/[0-9]*; do
        [ "$(sed 's/.*) //' "$p/stat" 2>/dev/null | cut -d' ' -f1)" != Z ] || continue
        tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -qF -- "$1/ceph.conf " &&
            echo "${p#/proc/}"
    done
    return 0
}
[ "$(running "$a" | wc -l)" = 4 ] || die "not 4 daemons in $a: $(running "$a")"

bash "$helper" stop "$a"
[ -z "$(running "$a")" ] || die "processes left after stop: $(running "$a")"
with_cluster "$b" cbt s3 mb s3://b-still-serves || die "$b stopped serving when $a stopped"
bash "$helper" stop "$b"
[ -z "$(running "$b")" ] || die "processes left after stop: $(running "$b")"
# stop of a stopped cluster is fine.
bash "$helper" stop "$a"
