#!/usr/bin/env bash
# Crash-safe tracking (the default): a crash never costs a full backup.
#   1. Five rounds of fio random writes through the daemon, kill -9 at a
#      random moment, restart: the bitmap is trusted, `cbt backup
#      --incremental` exits 0 and its restore is the disk byte for byte.
#   2. The same with a checkpoint open: kill -9 while a backup holds it.
#   3. Simulated power cuts (build option fault_injection: every bitmap
#      write not followed by a completed fdatasync is undone at a random
#      bitmap write, then SIGKILL), without and with backups running: the
#      next incremental still restores to the disk.
# Lazy mode keeps the old not-clean -> untrusted rule (test-backup-crash).

source "$(dirname "$0")/functions.sh"
requires fio qemu-io jq cmp
fio --enghelp=nbd >/dev/null 2>&1 || skip "fio has no nbd engine"

disk=$tmp/disk.img
bm=$tmp/disk.bitmap
repo=$tmp/repo
head -c $((64 * 1024 * 1024)) /dev/urandom >"$disk"
cat >"$tmp/job.fio" <<'JOB'
[global]
rw=randwrite
bs=4k
iodepth=32
size=64m
runtime=20
time_based=1
[w1]
[w2]
JOB

daemon()
{
    csock=$(mktemp -u "$tmp/ctl.XXXXXX")    # fresh: see test-backup-crash.sh
    start_filterd --image "$disk" --bitmap "$bm" --control "$csock"
}
fio_start()
{
    (cd "$tmp" && exec fio --ioengine=nbd --uri="$uri" "$tmp/job.fio" >"$tmp/fio.out" 2>&1) &
    fio_pid=$!
}
crash()
{
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    wait "$fio_pid" 2>/dev/null || true     # fio fails once the daemon is gone
}
# after_crash WHAT: restart, require a trusted bitmap, an incremental
# backup (settling a checkpoint left in progress) and an exact restore.
after_crash()
{
    daemon
    st=$(ctl "$csock" '{"execute":"status"}')
    json_true '.return.bitmap.trusted and .return.bitmap."crash-safe-at-start"' "$st" ||
        die "$1: bitmap not trusted after the crash: $st"
    expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --incremental
    rm -f "$tmp/r.raw"
    cbt restore --repo "$repo" --output "$tmp/r.raw" >/dev/null 2>&1 || die "$1: restore failed"
    cmp "$disk" "$tmp/r.raw" || die "$1: a changed block is missing from the bitmap"
}
msleep() { sleep "$(printf '0.%03d' "$1")"; }

daemon
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --full

# --- 1. kill -9 under random writes ----------------------------------------
for round in 1 2 3 4 5; do
    fio_start
    msleep $((RANDOM % 700 + 200))
    crash
    after_crash "kill -9, round $round"
done

# --- 2. kill -9 while a backup holds a checkpoint --------------------------
fio_start
backup_frozen_at_checkpoint "$csock" "$tmp/b.out" \
    "$CBT_CLI" backup --socket "$sock" --control "$csock" --repo "$repo" --incremental \
    --connections 1
msleep 500
crash
kill -CONT "$bp"
wait "$bp" 2>/dev/null || true
after_crash "kill -9 during a backup"

# --- 3. power cuts ----------------------------------------------------------
[ "${CBT_FAULT_INJECTION:-0}" = 1 ] || {
    stop_filterd
    echo "crash-safe tracking: kill -9 OK; power cuts skipped (build without -Dfault_injection=true)"
    exit 0
}
stop_filterd
cuts=0
for round in 1 2 3 4 5 6; do
    # Writes 1 and 2 are the start-up's "not clean" metadata update (the
    # daemon would die before it is ready); cut anywhere after them.
    at=$((RANDOM % 80 + 3))
    FILTERD_PREFIX="env CBT_FI_POWERCUT_FILE=$bm CBT_FI_POWERCUT_AT=$at" daemon
    fio_start
    if [ $((round % 2)) = 0 ]; then
        # A backup runs too, so cuts also land in checkpoint operations.
        "$CBT_CLI" backup --socket "$sock" --control "$csock" --repo "$repo" \
            >/dev/null 2>&1 &
        bp=$!
    fi
    for (( i = 0; i < 50; i++ )); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    grep -q "power cut" "$log" && cuts=$((cuts + 1))
    crash
    [ $((round % 2)) = 0 ] && { wait "$bp" 2>/dev/null || true; }
    after_crash "power cut at bitmap write $at, round $round"
    stop_filterd
done
[ "$cuts" -ge 3 ] || die "only $cuts of 6 rounds reached their power cut"
echo "crash-safe tracking: kill -9 and $cuts power cuts OK"
