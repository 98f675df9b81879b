#!/usr/bin/env bash
# cbt restore --instant: the disk of a backup point served read-write at
# once while it is copied into the output in the background.  On a
# repository of a full and an incremental backup made through the real
# daemon, the incremental point is restored instantly into a qcow2 with
# the background copy slowed to 1 MiB/s (--rate), so that clients really
# race it:
#   - while the copy runs (status says not complete), nbdcopy of the export
#     equals a normal cbt restore of the point (cmp), and status counts
#     bytes read from the backup: the reads were served from it;
#   - guest writes during the copy (partial granules, unaligned zeroes, a
#     run over several granules, in copied and not yet copied areas) read
#     back at once and the export equals (restore + those writes), the
#     same writes applied with qemu-io to a copy of the normal restore;
#   - dirty tracking (--bitmap) has the writes; a point-in-time
#     checkpoint is refused while the restore runs; the repository stays
#     locked;
#   - kill -9 in the middle (progress recorded only by the client's FLUSH:
#     --restore-sync-interval is set out of reach), then the same command
#     again: it resumes (a
#     note says so, and status shows progress kept), finishes, and the
#     export and then the output file equal (restore + writes): flushed
#     writes survived the crash and the copy;
#   - complete: status says so, the backup is closed and the repository
#     lock released; the qcow2 output has no backing file and passes
#     qemu-img check; SIGTERM exits 0; a third run serves it as complete;
#   - a raw output of the full point equals its normal restore;
#   - refusals: an existing output that is not this restore, a restore of
#     another point into an output in progress, a state file without its
#     output.

source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img nbdcopy nbdinfo jq cmp flock
export CBT_FILTERD             # cbt restore --instant runs it

disk=$tmp/disk.img
repo=$tmp/repo
csock=$tmp/ctl.sock
size=67108864
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

# Point 1 (full): half of every MiB data (a pattern per MiB), half hole.
args=()
for (( i = 0; i < 64; i++ )); do
    args+=(-c "write -P $((0x10 + i)) ${i}M 512k")
done
io "${args[@]}"
backup --full
# Point 2 (incremental): new data, zeroed and discarded ranges.
io -c 'write -P 0xc1 100k 300k' -c 'write -z 8M 128k' -c 'discard 20M 1M' \
   -c 'write -P 0xc2 40M 3M' -c 'write -P 0xc3 63M 1M'
backup --incremental
stop_filterd "$dpid"
cbt restore --repo "$repo" --at 2 --output "$tmp/ref2.raw" 2>/dev/null ||
    die "cbt restore --at 2 failed"
cbt restore --repo "$repo" --at 1 --output "$tmp/ref1.raw" 2>/dev/null ||
    die "cbt restore --at 1 failed"

out=$tmp/out.qcow2
isock=$tmp/instant.sock
ictl=$tmp/instant-ctl.sock
iuri="nbd+unix:///?socket=$isock"

# instant ARGS...: cbt restore --instant ... ARGS in the background, waits
# (bounded) for its pid file; sets $ipid and $ilog.
n=0
instant()
{
    local i
    n=$((n + 1))
    ilog=$tmp/instant-$n.log
    rm -f "$tmp/instant.pid"
    "$CBT_CLI" restore --instant --repo "$repo" --output "$out" --socket "$isock" \
        --control "$ictl" --pid-file "$tmp/instant.pid" "$@" >"$ilog" 2>&1 &
    ipid=$!
    _daemon_log[$ipid]=$ilog
    cleanup_fn _kill_daemon "$ipid"
    for (( i = 0; i < 600; i++ )); do
        [ -s "$tmp/instant.pid" ] && [ -S "$isock" ] && return 0
        if ! kill -0 "$ipid" 2>/dev/null; then
            cat "$ilog" >&2
            die "cbt restore --instant $* exited before serving"
        fi
        sleep 0.1
    done
    die "cbt restore --instant $*: no pid file after 60 s"
}
rstatus() { ctl "$ictl" '{"execute":"status"}' | jq -c '.return.restore'; }
# wait_complete: until status says complete and the backup is closed
# (a hang guard of 300 s, not a timing check).
wait_complete()
{
    local i s
    for (( i = 0; i < 3000; i++ )); do
        s=$(rstatus)
        json_true '.complete and (."source-open" | not)' "$s" && return 0
        json_true '.failed == null' "$s" || die "restore failed: $s"
        sleep 0.1
    done
    die "restore not complete after 300 s: $s"
}

# ---- first run: slowed down, so the clients race the copy ----
# Progress is recorded only when a client flushes (no periodic write-out),
# so the kill below finds exactly what the FLUSH rule made durable.
instant --at 2 --rate 1M --bitmap "$tmp/out.bitmap" -- --restore-sync-interval=86400
[ "$(cat "$tmp/instant.pid")" = "$ipid" ] || die "pid file is not cbt's pid (no exec?)"
st=$(rstatus)
json_true '.complete == false and .size == 67108864 and .granularity == 65536' "$st" ||
    die "status at start: $st"
[ "$(nbdinfo --size "$iuri")" -eq $size ] || die "export size"

nbdcopy "$iuri" "$tmp/copy1.raw"
cmp "$tmp/copy1.raw" "$tmp/ref2.raw" || die "reads during the copy differ from cbt restore"
st=$(rstatus)
json_true '.complete == false and ."restored-bytes" < 67108864 and
           ."source-read-bytes" > 0' "$st" ||
    die "the reads did not race the copy (or were not served from the backup): $st"

# Writes during the copy, and the same on a copy of the normal restore.
writes=(-c 'write -P 0xa1 61M 4k' -c 'write -P 0xa2 1000 100'
        -c 'write -z 52436992 64k' -c 'write -P 0xa3 31457792 2M'
        -c 'write -P 0xa4 67104768 4k')
cp "$tmp/ref2.raw" "$tmp/patched.raw"
qio -f raw "$tmp/patched.raw" "${writes[@]}"
qio -f raw "$iuri" "${writes[@]}" -c flush
qio -f raw "$iuri" -c 'read -P 0xa1 61M 4k' -c 'read -P 0x4d 63967232 60k' \
    -c 'read -P 0xa4 67104768 4k' -c 'read -P 0 52436992 64k'
nbdcopy "$iuri" "$tmp/copy2.raw"
cmp "$tmp/copy2.raw" "$tmp/patched.raw" || die "export after the writes differs"
st=$(rstatus)
json_true '."on-demand-copy-bytes" > 0' "$st" ||
    die "no granule was copied for a guest write (all copied already?): $st"

# Dirty tracking has the writes; no point-in-time view during the restore.
dirty=$(ctl "$ictl" '{"execute":"status"}' | jq '.return.bitmap."dirty-bytes"')
[ "$dirty" -gt 0 ] || die "the guest writes are not in the bitmap"
reply=$(ctl "$ictl" '{"execute":"checkpoint-begin","arguments":{"point-in-time":"full"}}')
grep -q 'instant restore is in progress' <<<"$reply" ||
    die "point-in-time checkpoint during the restore: $reply"
! flock -n -x "$repo/.lock" true || die "repository not locked during the restore"

st=$(rstatus)
json_true '.complete == false' "$st" || die "the copy finished too early for the test: $st"
kill -KILL "$ipid"
wait "$ipid" 2>/dev/null || true
before=$(jq -r '."durable-bytes"' <<<"$st")

# ---- second run: the same command, resumed, full speed ----
instant --at 2 --bitmap "$tmp/out.bitmap"
grep -q 'resuming the instant restore' "$ilog" || die "no resume note: $(cat "$ilog")"
wait_complete
st=$(rstatus)
json_true '."restored-bytes" == 67108864 and ."durable-bytes" == 67108864 and
           .copier == "done"' "$st" || die "status when complete: $st"
nbdcopy "$iuri" "$tmp/copy3.raw"
cmp "$tmp/copy3.raw" "$tmp/patched.raw" ||
    die "export after the resumed copy differs: flushed writes were copied over"
[ "$before" -gt 0 ] || die "no progress was durable before the kill: $st"
flock -n -x "$repo/.lock" true || die "repository still locked after the restore completed"
stop_filterd "$ipid"

qemu-img info --output=json "$out" | jq -e '."backing-filename" == null' >/dev/null ||
    die "the output still has a backing file"
qemu-img check -q "$out" || die "qemu-img check of the output failed"
qemu-img convert -O raw "$out" "$tmp/final.raw"
cmp "$tmp/final.raw" "$tmp/patched.raw" || die "the output differs from restore + writes"

# ---- third run: complete already, just served ----
instant --at 2
grep -q 'restore complete already' "$ilog" || die "no 'complete' note: $(cat "$ilog")"
json_true '.complete' "$(rstatus)" || die "third run not complete"
qio -f raw "$iuri" -c 'read -P 0xa3 31457792 2M'
stop_filterd "$ipid"

# ---- refusals ----
expect_rc 1 cbt restore --instant --repo "$repo" --at 1 --output "$out" --socket "$isock"
has "an instant restore of"
cp "$tmp/ref1.raw" "$tmp/other.raw"
expect_rc 1 cbt restore --instant --repo "$repo" --output "$tmp/other.raw" --socket "$isock"
has "is not an instant restore in progress"
cmp "$tmp/other.raw" "$tmp/ref1.raw" || die "a refused restore changed an existing file"
touch "$tmp/orphan.raw.restore-state"
expect_rc 1 cbt restore --instant --repo "$repo" --output "$tmp/orphan.raw" --socket "$isock"
has "remove the state file"
[ ! -e "$tmp/orphan.raw" ] || die "a refused restore created its output"
expect_rc 2 cbt restore --instant --repo "$repo" --output "$tmp/x.raw"
has "--socket or --listen is required"

# ---- raw output of the full point ----
out=$tmp/out1.raw
instant --at 1
wait_complete
nbdcopy "$iuri" "$tmp/copy4.raw"
cmp "$tmp/copy4.raw" "$tmp/ref1.raw" || die "raw instant restore: export differs"
stop_filterd "$ipid"
cmp "$out" "$tmp/ref1.raw" || die "raw instant restore: output differs"
echo ok
