#!/usr/bin/env bash
# Server errors during a backup into an S3 repository: a real Ceph RGW
# (tests/ceph-rgw.sh) behind a small fault-injecting proxy
# (tests/s3-fault-proxy.py) that answers chosen upload-part requests
# with an error, everything else passing through.
#   - one 503 SlowDown: retried with backoff (a note says so), the backup
#     succeeds and restores equal to the image;
#   - 500 InternalError on every part: the bounded retries give up, the
#     backup exits 1 naming the cause, then the checkpoint is aborted,
#     the upload aborted, the manifest and objects unchanged;
#   - 507 InsufficientCapacity (the store is full): exit 1 at once (not
#     retried), "the store is full", repository unchanged;
#   - a stalled store (the proxy reads the parts and answers nothing):
#     SIGTERM stops the backup in seconds, not after tries x 60 s of
#     curl's stall timeout: exit 1 naming the signal, checkpoint aborted,
#     upload aborted (the rest of the store still answers), repository
#     unchanged;
#   - a store that stalls every request: SIGTERM still ends the run (the
#     cleanup gets a bounded grace), and the next run cleans its upload;
#   - the next backup, with the server healthy again, succeeds with the
#     changes of the failed runs in it.

source "$(dirname "$0")/functions.sh"
# shellcheck source=tests/ceph-rgw.sh
source "$testsdir/ceph-rgw.sh"
requires ceph-mon ceph-mgr ceph-osd radosgw radosgw-admin monmaptool osdmaptool \
    curl cmp qemu-io jq

ceph_rgw_start "$tmp/ceph" || die "the Ceph cluster did not come up (see above)"
rgw_port=${AWS_ENDPOINT_URL##*:}
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
export AWS_MAX_ATTEMPTS=3
bucket=s3://cbt-errors
repo=$bucket/vm
cbt s3 mb "$bucket" || die "cannot create the bucket through the proxy"

disk=$tmp/disk.img
csock=$tmp/ctl.sock
truncate -s 256M "$disk"
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --control "$csock"
dsock=$sock
io() { qio -f raw "$uri" "$@"; }
no_checkpoint()
{
    local st
    st=$(ctl "$csock" '{"execute":"status"}')
    jq -e '.return.checkpoint == null' <<<"$st" >/dev/null ||
        die "$1: a checkpoint is still in progress: $st"
}
objects() { cbt s3 ls "$repo/" | awk '{ print $2 }' | sort; }

# One slow-down: retried, and the backup succeeds.
io -c 'write -P 0x11 0 120M'
echo "fail-parts-once 503 SlowDown" >"$ctlf"
cbt backup --socket "$dsock" --control "$csock" --repo "$repo" >/dev/null 2>"$tmp/b1.err" ||
    die "backup with one SlowDown failed: $(cat "$tmp/b1.err")"
grep -q "server error (SlowDown: injected by the test proxy); try 2 of 3" "$tmp/b1.err" ||
    die "the slow-down was not retried with a note: $(cat "$tmp/b1.err")"
grep -q -- "-> 503 SlowDown" "$tmp/proxy.log" || die "the proxy injected nothing"
cbt restore --repo "$repo" --output "$tmp/r1.raw" 2>/dev/null || die "restore failed"
cmp "$tmp/r1.raw" "$disk" || die "restore after a retried part differs"
rm -f "$tmp/r1.raw"

cbt s3 get "$repo/manifest.json" "$tmp/manifest.before"
objects >"$tmp/objects.before"
unchanged()
{
    echo pass >"$ctlf"
    cbt s3 get "$repo/manifest.json" "$tmp/manifest.after"
    cmp -s "$tmp/manifest.before" "$tmp/manifest.after" || die "$1: the manifest changed"
    objects | cmp -s - "$tmp/objects.before" || die "$1: the objects changed: $(objects)"
    [ -z "$(cbt s3 uploads "$repo/")" ] || die "$1: uploads left: $(cbt s3 uploads "$repo/")"
    no_checkpoint "$1"
}

# Every part fails with 500: the retries are bounded, then exit 1.
io -c 'write -P 0x22 100M 100M'
echo "fail-parts 500 InternalError" >"$ctlf"
expect_rc 1 cbt backup --socket "$dsock" --control "$csock" --repo "$repo" --full
# The cause, after the retries' notes and before what was done about it.
grep -qE "^cbt: S3 upload part [0-9]+ s3://cbt-errors/vm/[^ ]+: server error \(InternalError: injected by the test proxy\); gave up after 3 tries" <<<"$out" ||
    die "no line names the cause: $out"
has_in_order "gave up after 3 tries" "aborted: its changes merged back"
unchanged "500 on every part"

# The store is full: not retried.
echo "fail-parts 507 InsufficientCapacity" >"$ctlf"
expect_rc 1 cbt backup --socket "$dsock" --control "$csock" --repo "$repo" --full
has "the store is full (InsufficientCapacity"
grep -q "try 2 of" <<<"$out" && die "a full store was retried: $out"
unchanged "store full"

# A stalled store, then SIGTERM.  timeout only guards against a hang: the
# run ends well before it (the grace is 5 s), however slow the machine.
stalled_backup()
{
    local what=$1 n rc=0 bpid
    : >"$tmp/proxy.log"
    echo stall-parts >"$ctlf"
    # The binary itself, not the cbt function: $! must be its pid.
    "$CBT_CLI" backup --socket "$dsock" --control "$csock" --repo "$repo" --full \
        >/dev/null 2>"$tmp/stall.err" &
    bpid=$!
    for (( n = 0; n < 1200; n++ )); do
        grep -q "partNumber=.*-> stalled" "$tmp/proxy.log" && break
        kill -0 "$bpid" 2>/dev/null || die "$what: the backup ended before stalling: $(cat "$tmp/stall.err")"
        sleep 0.05
    done
    grep -q "partNumber=.*-> stalled" "$tmp/proxy.log" || die "$what: no part reached the proxy"
    echo "$what" >"$ctlf"
    kill -TERM "$bpid"
    timeout 30 tail --pid="$bpid" -f /dev/null ||
        { kill -KILL "$bpid"; die "$what: the backup did not stop after SIGTERM"; }
    wait "$bpid" || rc=$?
    out=$(cat "$tmp/stall.err")
    [ "$rc" -eq 1 ] || die "$what: exit $rc after SIGTERM, expected 1: $out"
    grep -q "SIGTERM" <<<"$out" || die "$what: the message does not name SIGTERM: $out"
    if grep -q "gave up after" <<<"$out"; then
        die "$what: a cancelled request was retried: $out"
    fi
}
io -c 'write -P 0x33 50M 60M'
stalled_backup stall-parts
has "checkpoint"
unchanged "SIGTERM while the store stalls the parts"

stalled_backup stall
echo pass >"$ctlf"
no_checkpoint "SIGTERM while the store stalls everything"
cbt s3 get "$repo/manifest.json" "$tmp/manifest.after"
cmp -s "$tmp/manifest.before" "$tmp/manifest.after" ||
    die "SIGTERM while the store stalls everything: the manifest changed"

# Healthy again: the next backup has the failed runs' changes (and
# removes the upload the last run could not abort).
echo pass >"$ctlf"
summary=$(cbt backup --socket "$dsock" --control "$csock" --repo "$repo" --json 2>/dev/null) ||
    die "backup after the errors failed"
[ "$(jq -r .kind <<<"$summary")" = incremental ] || die "not incremental: $summary"
[ -z "$(cbt s3 uploads "$repo/")" ] || die "uploads left: $(cbt s3 uploads "$repo/")"
cbt restore --repo "$repo" --output "$tmp/r2.raw" 2>/dev/null || die "restore failed"
cmp "$tmp/r2.raw" "$disk" || die "restore after the errors differs"
exit 0
