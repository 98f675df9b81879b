#!/usr/bin/env bash
# A backup that dies mid-copy leaves nothing half-written behind.
#
# To stop a backup mid-copy without relying on timing, the test waits until
# the backup's .partial file holds data (copying is under way), then
# freezes the daemon with SIGSTOP: the backup now waits for NBD replies and
# cannot finish, so what follows is deterministic.
#
#  1. kill -9 of `cbt backup` mid-copy: no manifest entry, the checkpoint
#     stays in progress in the daemon, the .partial file stays;
#  2. the next run aborts that checkpoint and removes the partial file
#     (saying so); while it is frozen mid-copy a second backup into the
#     same repository fails with "locked by pid N"; then SIGINT: exit 1,
#     the reason told before the checkpoint's abort, partial removed,
#     checkpoint aborted, the changes merged back into the
#     active bitmap (dirty-bytes), no manifest entry;
#  3. the next incremental restores exactly.

source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img jq cmp

disk=$tmp/disk.img
repo=$tmp/repo
csock=$tmp/ctl.sock
truncate -s 512M "$disk"
make_pattern_file "$tmp/fill" $((192 << 20)) 0x5a
dd if="$tmp/fill" of="$disk" conv=notrunc,sparse bs=1M status=none
rm "$tmp/fill"
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --control "$csock"

status_json() { ctl "$csock" '{"execute":"status"}'; }
count() { cbt list --repo "$repo" --json | jq .count; }

cbt backup --socket "$sock" --control "$csock" --repo "$repo" -q || die "full backup failed"
full_cp=$(cbt list --repo "$repo" --json | jq -r '.backups[0].checkpoint')
# 192 MiB of changes, so that the incremental takes a while to copy.
qio -f raw "$uri" -c 'write -P 0x61 0 64M' -c 'write -P 0x62 200M 64M' -c 'write -P 0x63 400M 64M'
changed=$((192 << 20))

# start_and_freeze: start a backup in the background ($bpid, stderr in
# $berr), wait until its partial file (a new one: not the inode of a stale
# one, which we hold open) holds 4 to 64 MiB of the 192 MiB to copy, and freeze the daemon.
# The wait is a tight loop in python (no process per check), so it sees
# the file long before the copy ends; if the backup still got past it,
# the test says so instead of passing by accident.
berr=$tmp/backup.err
partial_ino() { stat -c %i $(compgen -G "$repo/*.qcow2.partial") 2>/dev/null || true; }
start_and_freeze()
{
    local old f
    old=$(partial_ino)
    # Hold a stale partial file open: once unlinked, its inode number
    # cannot be reused for the new one while we keep it.
    f=$(compgen -G "$repo/*.qcow2.partial" || true)
    if [ -n "$f" ]; then exec 8<"$f"; else exec 8</dev/null; fi
    # Not through the cbt function: $! must be the cbt process itself.
    "$CBT_CLI" backup --socket "$sock" --control "$csock" --repo "$repo" \
        >/dev/null 2>"$berr" &
    bpid=$!
    "$PYTHON" - "$repo" "${old:-0}" "$pid" "$bpid" <<'PYEOF' ||
import glob, os, signal, sys
repo, old, daemon, backup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
while True:
    for p in glob.glob(repo + "/*.qcow2.partial"):
        try:
            st = os.stat(p)
        except FileNotFoundError:
            continue
        if st.st_ino != old and st.st_size >= 4 << 20:
            if st.st_size > 64 << 20:
                sys.exit("saw the partial file only at %d bytes" % st.st_size)
            os.kill(daemon, signal.SIGSTOP)
            sys.exit(0)
    try:
        os.waitpid(backup, os.WNOHANG)
    except ChildProcessError:
        pass
    if not os.path.exists("/proc/%d" % backup) or \
       open("/proc/%d/stat" % backup).read().split()[2] == "Z":
        sys.exit("the backup ended before it was seen copying")
PYEOF
        { cat "$berr" >&2; die "could not freeze the backup mid-copy"; }
    exec 8<&-
    kill -0 "$bpid" 2>/dev/null || die "the backup ended before the daemon was frozen"
}
thaw() { kill -CONT "$pid"; }
cleanup_fn kill -CONT "$pid"

# 1. kill -9 mid-copy.
start_and_freeze
kill -KILL "$bpid"
wait "$bpid" 2>/dev/null || true
thaw
[ "$(count)" -eq 1 ] || die "a killed backup got a manifest entry"
compgen -G "$repo/*.qcow2.partial" >/dev/null || die "no partial file after kill -9 (test broken?)"
st=$(status_json)
killed_cp=$(jq -r .return.checkpoint.checkpoint <<<"$st")
jq -e --arg p "$full_cp" '.return.checkpoint.previous == $p' <<<"$st" >/dev/null ||
    die "no checkpoint in progress after the killed backup: $st"

# 2. The next run cleans up; freeze it mid-copy too.
start_and_freeze
grep -q "checkpoint $killed_cp was left in progress by a backup that did not finish: aborting it" "$berr" ||
    die "leftover checkpoint not aborted: $(cat "$berr")"
grep -q 'qcow2.partial: removed (left by a backup that did not finish)' "$berr" ||
    die "stale partial file not removed: $(cat "$berr")"
[ "$(compgen -G "$repo/*.qcow2.partial" | wc -l)" -eq 1 ] || die "old partial file still there"

# A second backup into the same repository meanwhile: locked.
status=0
out=$(cbt backup --socket "$sock" --control "$csock" --repo "$repo" 2>&1) || status=$?
[ $status -eq 1 ] || die "concurrent backup: exit $status, expected 1: $out"
grep -q "repository $repo is locked by pid $bpid" <<<"$out" || die "concurrent backup: $out"

kill -INT "$bpid"
thaw
status=0
wait "$bpid" || status=$?
[ $status -eq 1 ] || die "backup after SIGINT: exit $status, expected 1: $(cat "$berr")"
grep -q 'interrupted by SIGINT' "$berr" || die "no reason after SIGINT: $(cat "$berr")"
grep -q 'aborted: its changes merged back into the bitmap' "$berr" ||
    die "checkpoint not aborted after SIGINT: $(cat "$berr")"
out=$(cat "$berr")
has_in_order 'interrupted by SIGINT' 'aborted: its changes merged back into the bitmap'
[ "$(count)" -eq 1 ] || die "an interrupted backup got a manifest entry"
[ -z "$(compgen -G "$repo/*.partial" || true)" ] || die "partial file left after SIGINT"
st=$(status_json)
jq -e --arg p "$full_cp" --argjson n $changed '.return.checkpoint == null and
    .return.bitmap.checkpoint == $p and .return.bitmap.trusted and
    .return.bitmap."dirty-bytes" == $n' <<<"$st" >/dev/null ||
    die "bits not merged back / checkpoint not restored after SIGINT: $st"

# 3. The next incremental holds every change.
out=$(cbt backup --socket "$sock" --control "$csock" --repo "$repo" --incremental --json) ||
    die "incremental after the interruptions failed"
jq -e --argjson n $changed '.kind == "incremental" and ."dirty-bytes" == $n and
    ."bytes-copied" <= $n' <<<"$out" >/dev/null || die "unexpected incremental: $out"
cbt restore --repo "$repo" --output "$tmp/r.raw" 2>/dev/null
cmp "$disk" "$tmp/r.raw" || die "restore after interrupted backups differs from the image"
cbt verify --repo "$repo" >/dev/null 2>&1 || die "verify failed"
exit 0
