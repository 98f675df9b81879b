#!/usr/bin/env bash
# cbt serve: a backup point as a read-only NBD export (cbt-filterd on the
# backup's qcow2 file, its chain checked as cbt restore checks it).  On a
# repository of a full backup and an incremental made through the real
# daemon:
#   - each point: nbdinfo --size is the image size and --is read-only
#     holds; nbdcopy of the export equals cbt restore of the same point
#     (cmp) and the image as it was; qemu-img compare reads it; nbdinfo
#     --map shows the never-written range as a hole; qemu-io cannot open
#     it for writing; afterwards cbt verify finds every file unchanged;
#   - cbt serve becomes the daemon (exec): the pid in --pid-file is the
#     pid cbt serve started with, and SIGTERM stops it with status 0;
#   - while it serves the repository is locked (cbt backup and pruning's
#     exclusive flock are refused); after it stops, it is free;
#   - options after -- reach cbt-filterd (--export-name via --, and
#     --verbose's log lines);
#   - refusals: no --socket/--listen (2), unknown backup (1), a chain file
#     replaced by a symbolic link (4, no socket created).

source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img nbdinfo nbdcopy jq cmp flock

disk=$tmp/disk.img
repo=$tmp/repo
csock=$tmp/ctl.sock
truncate -s 64M "$disk"
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --control "$csock"
dsock=$sock

io() { qio -f raw "$uri" "$@"; }
backup()
{
    cbt backup --socket "$dsock" --control "$csock" --repo "$repo" "$@" >/dev/null \
        2>"$tmp/backup.err" || { cat "$tmp/backup.err" >&2; die "cbt backup $*: failed"; }
}

# Point 1 (full): data and a hole from 16M to 48M; point 2 (incremental):
# new data, a zeroed and a discarded range.
io -c 'write -P 0x11 0 1M' -c 'write -P 0x22 8M 300k' -c 'write -P 0x33 63M 1M'
backup --full
cp --sparse=always "$disk" "$tmp/point1.raw"
io -c 'write -P 0x44 4k 4k' -c 'write -z 8M 128k' -c 'discard 63M 64k' \
   -c 'write -P 0x55 40M 1M'
backup --incremental
cp --sparse=always "$disk" "$tmp/point2.raw"
mapfile -t files < <(jq -r '.backups[].file' "$repo/manifest.json")

# serve AT ARGS...: cbt serve --at AT ARGS in the background; waits
# (bounded, 60 s) for its pid file.  Sets $spid, $ssock, $suri.
n=0
serve()
{
    local at=$1 i
    shift
    n=$((n + 1))
    ssock=$tmp/serve-$n.sock
    suri="nbd+unix:///?socket=$ssock"
    "$CBT_CLI" serve --repo "$repo" --at "$at" --socket "$ssock" \
        --pid-file "$tmp/serve-$n.pid" "$@" >"$tmp/serve-$n.log" 2>&1 &
    spid=$!
    cleanup_fn _kill_daemon "$spid"
    for (( i = 0; i < 600; i++ )); do
        [ -s "$tmp/serve-$n.pid" ] && [ -S "$ssock" ] && return 0
        if ! kill -0 "$spid" 2>/dev/null; then
            cat "$tmp/serve-$n.log" >&2
            die "cbt serve --at $at exited before serving"
        fi
        sleep 0.1
    done
    die "cbt serve --at $at: no pid file after 60 s"
}

for p in 1 2; do
    serve "$p"
    [ "$(cat "$tmp/serve-$n.pid")" = "$spid" ] ||
        die "pid file says $(cat "$tmp/serve-$n.pid"), cbt serve was $spid (no exec?)"
    [ "$(nbdinfo --size "$suri")" -eq 67108864 ] || die "point $p: nbdinfo --size"
    nbdinfo --is read-only "$suri" || die "point $p: the export is not read-only"
    cbt restore --repo "$repo" --at "$p" --output "$tmp/r$p.raw" 2>/dev/null ||
        die "restore --at $p failed"
    nbdcopy "$suri" "$tmp/copy$p.raw"
    cmp "$tmp/copy$p.raw" "$tmp/r$p.raw" || die "point $p: nbdcopy differs from cbt restore"
    cmp "$tmp/copy$p.raw" "$tmp/point$p.raw" || die "point $p: nbdcopy differs from the image"
    qemu-img compare -q -f raw -F raw "$suri" "$tmp/r$p.raw" ||
        die "point $p: qemu-img compare of the export with the restore"
    map=$(nbdinfo --map --json "$suri")
    json_true 'any(.[]; .offset <= 16777216 and .offset + .length >= 33554432 and
                   .type == 3)' "$map" || die "point $p: 16M..32M is not a hole: $map"
    qio_fails "Permission denied" -f raw "$suri" -c 'write -P 0x99 0 4k'
    # Locked while serving.
    expect_rc 1 cbt backup --socket "$dsock" --control "$csock" --repo "$repo"
    has "is locked"
    ! flock -n -x "$repo/.lock" true || die "pruning's lock was granted while serving"
    stop_filterd "$spid"
    flock -n -x "$repo/.lock" true || die "the repository is still locked after serving"
done

# Options after -- go to cbt-filterd.
serve latest -- --export-name=point --verbose
[ "$(nbdinfo --size "nbd+unix:///point?socket=$ssock")" -eq 67108864 ] ||
    die "export name given after -- not used"
grep -q "cbt backup 2 (${files[1]})" <(nbdinfo --json "nbd+unix:///point?socket=$ssock") ||
    die "no description naming the backup"
stop_filterd "$spid"
grep -qi "connect" "$tmp/serve-$n.log" || die "--verbose after -- did not reach the daemon"

# Refusals.
expect_rc 2 cbt serve --repo "$repo"
has "--socket or --listen is required"
expect_rc 1 cbt serve --repo "$repo" --at 7 --socket "$tmp/x.sock"
has "no backup '7'"
cp -a "$repo" "$tmp/repo-link"
cp "$tmp/repo-link/${files[0]}" "$tmp/full-copy.qcow2"
ln -sf "$tmp/full-copy.qcow2" "$tmp/repo-link/${files[0]}"
expect_rc 4 cbt serve --repo "$tmp/repo-link" --socket "$tmp/x.sock"
has "is a symbolic link"
[ ! -e "$tmp/x.sock" ] || die "a refused cbt serve created its socket"

# Serving changed no file of the repository.
cbt verify --repo "$repo" >/dev/null 2>&1 || die "cbt verify failed after serving"

stop_filterd "$pid"
echo ok
