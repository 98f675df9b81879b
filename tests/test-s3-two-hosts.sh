#!/usr/bin/env bash
# Two hosts backing up into one bucket at once (issue 15): two daemons,
# each with its own image, each backed up into its own prefix of one
# bucket on a real Ceph RGW (tests/ceph-rgw.sh) -- prefixes "vm" and
# "vm2", one a string prefix of the other, so a run that cleaned up or
# listed by a bare string prefix would touch the other's objects.
#   - full backups of both at the same time, then incrementals of both at
#     the same time: each succeeds, each prefix lists exactly its own
#     files, and each restores equal to its own image;
#   - one writer per repository: while the first host's backup runs, a
#     backup of the second daemon into the first's prefix fails (exit 1)
#     naming the holder of the lock object, and changes nothing;
#   - a writer that loses its lock stops: the lock object of a running
#     backup (ttl 4 s, refreshed every second) is deleted behind its back
#     while its daemon is stopped; the backup exits 1 saying the lock is
#     lost, aborts its checkpoint, and the manifest stays as it was.

source "$(dirname "$0")/functions.sh"
# shellcheck source=tests/ceph-rgw.sh
source "$testsdir/ceph-rgw.sh"
requires ceph-mon ceph-mgr ceph-osd radosgw radosgw-admin monmaptool osdmaptool \
    curl cmp qemu-io jq

ceph_rgw_start "$tmp/ceph" || die "the Ceph cluster did not come up (see above)"
bucket=s3://cbt-fleet
cbt s3 mb "$bucket" || die "cannot create the bucket"

declare -A dsock csock repo files dpid
for h in a b; do
    truncate -s 256M "$tmp/$h.img"
    start_filterd --image "$tmp/$h.img" --bitmap "$tmp/$h.bitmap" --control "$tmp/$h.ctl"
    dsock[$h]=$sock
    csock[$h]=$tmp/$h.ctl
    dpid[$h]=$pid
done
repo[a]=$bucket/vm
repo[b]=$bucket/vm2
io() { qio -f raw "nbd+unix:///?socket=${dsock[$1]}" "${@:2}"; }

# backup_bg HOST ARGS...: start a backup of HOST into its repository.
declare -A bpid
backup_bg()
{
    local h=$1
    shift
    "$CBT_CLI" backup --socket "${dsock[$h]}" --control "${csock[$h]}" --repo "${repo[$h]}" \
        --json "$@" >"$tmp/$h.json" 2>"$tmp/$h.err" &
    bpid[$h]=$!
    cleanup_fn _kill_quietly "${bpid[$h]}"
}
wait_backup()
{
    local h=$1 rc=0
    wait "${bpid[$h]}" || rc=$?
    [ "$rc" -eq 0 ] || die "backup of host $h: exit $rc: $(cat "$tmp/$h.err")"
}

# Different data on each host, backed up at once.
io a -c 'write -P 0xa1 0 100M' -c 'write -P 0xa2 200M 20M'
io b -c 'write -P 0xb1 50M 100M' -c 'write -P 0xb2 250M 6M'
backup_bg a
backup_bg b
wait_backup a
wait_backup b
for h in a b; do
    [ "$(jq -r .kind "$tmp/$h.json")" = full ] || die "host $h: $(cat "$tmp/$h.json")"
    files[$h]=$(jq -r .file "$tmp/$h.json")
done

# Both again, incremental, at once.
io a -c 'write -P 0xa3 10M 3M' -c 'write -z 200M 1M'
io b -c 'write -P 0xb3 60M 5M' -c 'discard 250M 1M'
backup_bg a
backup_bg b
wait_backup a
wait_backup b
for h in a b; do
    [ "$(jq -r .kind "$tmp/$h.json")" = incremental ] || die "host $h: $(cat "$tmp/$h.json")"
    files[$h]="${files[$h]} $(jq -r .file "$tmp/$h.json")"
done

# Each prefix holds exactly its own files, and restores to its own image.
for h in a b; do
    p=${repo[$h]#"$bucket/"}
    listed=$(cbt list --repo "${repo[$h]}" --json | jq -r '[.backups[].file] | join(" ")')
    [ "$listed" = "${files[$h]}" ] || die "host $h lists '$listed', expected '${files[$h]}'"
    want=$(for f in ${files[$h]} manifest.json; do echo "$p/$f"; done | sort)
    got=$(cbt s3 ls "${repo[$h]}/" | awk '{ print $2 }' | sort)
    [ "$got" = "$want" ] || die "host $h: objects under $p/: $got; expected $want"
    cbt restore --repo "${repo[$h]}" --output "$tmp/$h.r.raw" 2>/dev/null ||
        die "restore of host $h failed"
    cmp "$tmp/$h.r.raw" "$tmp/$h.img" || die "host $h restores to something else"
    cbt verify --repo "${repo[$h]}" >/dev/null 2>&1 || die "verify of host $h failed"
done
[ -z "$(cbt s3 uploads "$bucket")" ] || die "uploads left: $(cbt s3 uploads "$bucket")"

# One writer per repository: host b cannot write into host a's prefix
# while a's backup holds the lock.
cbt s3 get "${repo[a]}/manifest.json" "$tmp/manifest.before"
io a -c 'write -P 0xa4 0 200M'
backup_bg a --full --connections 1
for (( i = 0; i < 600; i++ )); do
    cbt s3 head "${repo[a]}/lock" >/dev/null 2>&1 && break
    kill -0 "${bpid[a]}" 2>/dev/null || die "host a's backup ended before its lock was seen"
    sleep 0.05
done
expect_rc 1 cbt backup --socket "${dsock[b]}" --control "${csock[b]}" --repo "${repo[a]}"
has "S3 lock ${repo[a]}/lock: held by $(hostname) pid ${bpid[a]}"
st=$(ctl "${csock[b]}" '{"execute":"status"}')
jq -e '.return.checkpoint == null' <<<"$st" >/dev/null || die "host b: checkpoint left: $st"
wait_backup a
cbt restore --repo "${repo[a]}" --output "$tmp/a.r2.raw" 2>/dev/null || die "restore of a failed"
cmp "$tmp/a.r2.raw" "$tmp/a.img" || die "host a restores to something else after the conflict"

# The lock taken away from a running backup: it must stop.
cbt s3 get "${repo[b]}/manifest.json" "$tmp/manifest.before"
io b -c 'write -P 0xb4 0 200M'
CBT_S3_LOCK_TTL=4 backup_bg b --full --connections 1
for (( i = 0; i < 600; i++ )); do
    cbt s3 head "${repo[b]}/lock" >/dev/null 2>&1 && break
    kill -0 "${bpid[b]}" 2>/dev/null || die "host b's backup ended before its lock was seen"
    sleep 0.05
done
# The daemon stopped holds the backup before it has written much.
kill -STOP "${dpid[b]}"
cleanup_fn kill -CONT "${dpid[b]}"
cbt s3 rm "${repo[b]}/lock" || die "cannot delete the lock object"
sleep 3                           # > one refresh period (ttl/4 = 1 s)
kill -CONT "${dpid[b]}"
rc=0
wait "${bpid[b]}" || rc=$?
[ "$rc" -eq 1 ] || die "backup that lost its lock: exit $rc: $(cat "$tmp/b.err")"
grep -q "the repository lock is lost" "$tmp/b.err" || die "lock loss not named: $(cat "$tmp/b.err")"
grep -q "checkpoint .* aborted" "$tmp/b.err" || die "checkpoint not aborted: $(cat "$tmp/b.err")"
cbt s3 get "${repo[b]}/manifest.json" "$tmp/manifest.after"
cmp -s "$tmp/manifest.before" "$tmp/manifest.after" || die "the manifest changed after the lock was lost"
exit 0
