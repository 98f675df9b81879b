#!/usr/bin/env bash
# cbt/cbt-nightly.sh: logs with timestamps, passes cbt's exit status
# through, refuses to run twice at once, and with KEEP_CHAINS=2 prunes the
# oldest chain whole (manifest first, then files) while the newest chain
# still restores exactly.

source "$(dirname "$0")/functions.sh"
requires qemu-io jq flock cmp
: "${CBT_CLI:=$CBT_BUILD_DIR/cbt/cbt}"
nightly=$CBT_SOURCE_DIR/cbt/cbt-nightly.sh

disk=$tmp/disk.img
csock=$tmp/ctl.sock
truncate -s 16M "$disk"
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --tracking lazy --control "$csock"

export CBT=$CBT_CLI CBT_REPO=$tmp/repo CBT_CONTROL=$csock CBT_SOCKET=$sock
export CBT_LOG=$tmp/nightly.log KEEP_CHAINS=2
run() { CBT_BACKUP_ARGS="$*" bash "$nightly"; }
files() { "$CBT_CLI" list --repo "$CBT_REPO" --json | jq -r '.backups[].file'; }

n=0
for args in "" "" --full "" --full; do
    n=$((n + 1))
    qemu-io -f raw "$uri" -c "write -P $n $((n * 1024))k 64k" >/dev/null
    run $args || die "nightly run $n ($args) failed"
    [ $n -eq 2 ] && first_chain=$(files)
done
# 5 backups in 3 chains (F I | F I | F): the first chain is gone.
[ "$("$CBT_CLI" list --repo "$CBT_REPO" --json | jq '[.count, .chains]' -c)" = "[3,2]" ] ||
    die "unexpected repository after pruning: $("$CBT_CLI" list --repo "$CBT_REPO")"
for f in $first_chain; do
    [ ! -e "$CBT_REPO/$f" ] || die "$f of the pruned chain still exists"
    grep -q "pruned $f" "$CBT_LOG" || die "pruning of $f not logged"
done
grep -qE '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}Z cbt-nightly\[[0-9]+\]: pruned 1 of 3 chains' "$CBT_LOG" ||
    die "no timestamped prune summary in the log: $(cat "$CBT_LOG")"
grep -q 'backup .*: incremental' "$CBT_LOG" || die "cbt's summary is not logged"
"$CBT_CLI" verify --repo "$CBT_REPO" >/dev/null 2>&1 || die "verify after pruning failed"
"$CBT_CLI" restore --repo "$CBT_REPO" --output "$tmp/r.raw" 2>/dev/null
cmp "$disk" "$tmp/r.raw" || die "restore after pruning differs"

# Exit status passthrough: --incremental after a daemon crash exits 3.
kill -KILL "$pid"; wait "$pid" 2>/dev/null || true
# A fresh control socket: the dead daemon's may accept connections for a
# moment after kill -9 (asynchronous io_uring teardown).
csock=$tmp/ctl2.sock
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --tracking lazy --control "$csock"
export CBT_SOCKET=$sock CBT_CONTROL=$csock
status=0; run --incremental || status=$?
[ $status -eq 3 ] || die "nightly with an impossible --incremental: exit $status, expected 3"
grep -q 'backup FAILED with exit status 3; nothing pruned' "$CBT_LOG" || die "failure not logged"

# One run at a time.
exec 7>>"$CBT_REPO/.nightly.lock"
flock -n 7 || die "cannot take the nightly lock"
status=0; run || status=$?
[ $status -eq 1 ] || die "second concurrent nightly: exit $status, expected 1"
grep -q 'another cbt-nightly is running' "$CBT_LOG" || die "lock conflict not logged"
exec 7>&-

# A configuration error is exit 2.
status=0; KEEP_CHAINS=0 run || status=$?
[ $status -eq 2 ] || die "KEEP_CHAINS=0: exit $status, expected 2"
exit 0
