#!/usr/bin/env bash
# The S3 repository lock and process identity (issue 22): a lock taken by
# a backup lives as long as its process, and a later writer on the same
# host takes over the lock of a process that no longer exists.  "Same
# host" is not enough to tell: a pid means something only in its pid
# namespace and its boot.  On a real Ceph RGW (tests/ceph-rgw.sh), with
# two daemons so that a writer that wrongly takes the lock finishes
# instead of hanging:
#   - a backup in another pid namespace (unshare --pid) holds the lock,
#     with a pid that names no process in ours: a backup from our
#     namespace is refused (exit 1), naming the holder, its namespace and
#     how to remove a lock that is stale; the lock stays the holder's;
#   - the other way round: a backup in a new pid namespace is refused the
#     lock a backup of ours holds (our pids are not visible there);
#   - the lock object records our boot id and pid namespace;
#   - a lock of this host name from another boot is taken over although
#     its pid exists now; one of our boot and namespace whose process is
#     gone is taken over; one of our boot and namespace whose process runs
#     is refused;
#   - lock objects without these fields (older cbt) keep the old rule:
#     taken over when the pid does not exist here, refused when it does.

source "$(dirname "$0")/functions.sh"
# shellcheck source=tests/ceph-rgw.sh
source "$testsdir/ceph-rgw.sh"
requires ceph-mon ceph-mgr ceph-osd radosgw radosgw-admin monmaptool osdmaptool \
    curl qemu-io jq unshare
[ "$(id -u)" = 0 ] || skip "unshare --pid needs root"
unshare --pid --fork --mount-proc --kill-child true 2>/dev/null ||
    skip "cannot create a pid namespace here"

ceph_rgw_start "$tmp/ceph" || die "the Ceph cluster did not come up (see above)"
bucket=s3://cbt-lock-ns
repo=$bucket/vm
lock=$repo/lock
cbt s3 mb "$bucket" || die "cannot create the bucket"
host=$(hostname)
# Locks outlive every step here by far, whatever the machine's load.
export CBT_S3_LOCK_TTL=600
boot_id=$(cat /proc/sys/kernel/random/boot_id)
our_ns=$(stat -L -c %i /proc/self/ns/pid)

# Daemon a serves the holders, daemon b the contenders.
declare -A dsock csock dpid
for h in a b; do
    truncate -s 64M "$tmp/$h.img"
    start_filterd --image "$tmp/$h.img" --bitmap "$tmp/$h.bitmap" --control "$tmp/$h.ctl"
    dsock[$h]=$sock
    csock[$h]=$tmp/$h.ctl
    dpid[$h]=$pid
    qio -f raw "$uri" -c "write -P 0x5$h 0 4M"
done
backup_args() { echo --socket "${dsock[$1]}" --control "${csock[$1]}" --repo "$repo"; }

# A holder that stays: daemon a is stopped, so a backup of it takes the
# lock, then waits for the daemon's answer to its first request forever,
# while its thread keeps the lock refreshed.
kill -STOP "${dpid[a]}"
cleanup_fn kill -CONT "${dpid[a]}"

# lock_json: the lock object, or nothing.
lock_json() { cbt s3 get "$lock" - 2>/dev/null || true; }
# wait_lock_pid PID HOLDER: wait until the lock object names PID (a guard
# of 30 s against a hang, not a timing check); HOLDER must live meanwhile.
wait_lock_pid()
{
    local i
    for (( i = 0; i < 600; i++ )); do
        [ "$(lock_json | jq -r .pid 2>/dev/null)" = "$1" ] && return 0
        kill -0 "$2" 2>/dev/null || die "the holder ended before its lock was seen: $(cat "$tmp/holder.err")"
        sleep 0.05
    done
    die "no lock of pid $1 after 30 s: $(lock_json)"
}
# put_lock JSON: write a lock object as another cbt would have.
put_lock() { printf '%s' "$1" | cbt s3 put - "$lock" >/dev/null || die "cannot write the lock"; }
# crafted_lock PID [EXTRA-JSON]: a live (ttl 600), process-bound lock of
# this host name.
crafted_lock()
{
    put_lock "$(jq -nc --arg h "$host" --argjson p "$1" --argjson x "${2:-{\}}" \
        '{format: "cbt-s3-lock", version: 1, owner: "crafted-token", host: $h,
          pid: $p, note: "crafted", ttl: 600, "written-unix": 0, "pid-holds": true} + $x')"
}
contender_refused()
{
    expect_rc 1 cbt backup $(backup_args b)
    has "S3 lock $lock: "
    has "held by $host pid $1"
    [ "$(lock_json | jq -r .owner)" = "$2" ] || die "the lock changed hands: $(lock_json)"
}
contender_takes_over()
{
    expect_rc 0 cbt backup $(backup_args b)
    has "S3 lock $lock: took over $1"
    [ -z "$(lock_json)" ] || die "lock left after the backup: $(lock_json)"
}

# --- 1. the holder in another pid namespace, the contender in ours ----------
# Its pid there is one that no process has here (free, and below the last
# pid handed out here, so not handed out again before the pids wrap):
# before the fix, that made a live lock look like a dead process's.
free_pid=$("$PYTHON" -c '
import os
last = int(open("/proc/sys/kernel/ns_last_pid").read())
print(next(p for p in range(last - 1, 300, -1) if not os.path.exists("/proc/%d" % p)))')
# Inside: the namespace's next pid is set to free_pid, then the backup is
# started (as its second process, so it gets that pid).
unshare --pid --fork --mount-proc --kill-child bash -c '
    echo $(( $1 - 1 )) >/proc/sys/kernel/ns_last_pid
    "$CBT_CLI" backup "${@:2}" &
    wait' _ "$free_pid" $(backup_args a) >"$tmp/holder.out" 2>"$tmp/holder.err" &
holder=$!
cleanup_fn _kill_quietly "$holder"
wait_lock_pid "$free_pid" "$holder"
[ ! -e "/proc/$free_pid" ] || die "pid $free_pid exists here: the test cannot tell"
held=$(lock_json)
holder_ns=$(jq -r '."pid-ns"' <<<"$held")
[ "$holder_ns" != "$our_ns" ] || die "the holder is in our pid namespace: $held"
contender_refused "$free_pid" "$(jq -r .owner <<<"$held")"
has "in another pid namespace (pid:[$holder_ns]"
has "cbt s3 rm $lock"
# The holder goes (all of its namespace with it); its lock stays, still
# unjudgeable from here, until removed as the message says.
kill -KILL "$holder"
wait "$holder" 2>/dev/null || true
contender_refused "$free_pid" "$(jq -r .owner <<<"$held")"
cbt s3 rm "$lock" || die "cannot remove the lock"
expect_rc 0 cbt backup $(backup_args b)

# --- 2. the holder in ours, the contender in a new pid namespace ------------
"$CBT_CLI" backup $(backup_args a) >"$tmp/holder.out" 2>"$tmp/holder.err" &
holder=$!
cleanup_fn _kill_quietly "$holder"
wait_lock_pid "$holder" "$holder"
held=$(lock_json)
jq -e --arg b "$boot_id" --argjson n "$our_ns" --arg h "$host" \
    '.host == $h and ."boot-id" == $b and ."pid-ns" == $n and ."pid-holds"' \
    <<<"$held" >/dev/null || die "the lock does not record our boot and namespace: $held"
expect_rc 1 unshare --pid --fork --mount-proc --kill-child "$CBT_CLI" backup $(backup_args b)
has "held by $host pid $holder"
has "in another pid namespace (pid:[$our_ns]"
[ "$(lock_json | jq -r .owner)" = "$(jq -r .owner <<<"$held")" ] ||
    die "the lock changed hands: $(lock_json)"
kill -KILL "$holder"
wait "$holder" 2>/dev/null || true
# Gone, in our namespace and boot: taken over at once.
contender_takes_over "a lock that a dead process on this host left"

# --- 3. crafted locks: boot and namespace ------------------------------------
# Another boot of this host: over, whatever runs under that pid now.
crafted_lock $$ "$(jq -nc --argjson n "$our_ns" \
    '{"boot-id": "00000000-0000-4000-8000-000000000000", "pid-ns": $n}')"
contender_takes_over "a lock that a process of an earlier boot of this host left"
# This boot and namespace, a live pid: refused.
crafted_lock $$ "$(jq -nc --arg b "$boot_id" --argjson n "$our_ns" '{"boot-id": $b, "pid-ns": $n}')"
contender_refused $$ crafted-token
# This boot and namespace, no such process: taken over.
crafted_lock "$free_pid" "$(jq -nc --arg b "$boot_id" --argjson n "$our_ns" \
    '{"boot-id": $b, "pid-ns": $n}')"
contender_takes_over "a lock that a dead process on this host left"

# --- 4. locks of an older cbt (no boot id, no namespace): as before ----------
crafted_lock $$
contender_refused $$ crafted-token
crafted_lock "$free_pid"
contender_takes_over "a lock that a dead process on this host left"
exit 0
