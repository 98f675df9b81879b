#!/usr/bin/env bash
# Command line errors: a missing or unusable image, bad flags and values,
# a socket path where a live daemon listens.  Each must exit non-zero with
# one line on stderr that names the culprit, leave nothing behind, and not
# disturb the daemon already running.  A stale socket file is replaced.

source "$(dirname "$0")/functions.sh"
requires timeout nbdinfo "$PYTHON"

disk=$tmp/disk.img
truncate -s 1M "$disk"
[ -x "$CBT_FILTERD" ] || die "daemon $CBT_FILTERD not found"

# cli_error WANT ARGS...: cbt-filterd ARGS must fail with one stderr line
# containing WANT.  `timeout` only stops a daemon that wrongly started.
n=0
cli_error()
{
    local want=$1 status=0 err lines
    shift
    n=$((n + 1))
    err=$tmp/cli-$n.err
    timeout 30 "$CBT_FILTERD" "$@" --pid-file "$tmp/cli-$n.pid" \
        </dev/null >/dev/null 2>"$err" || status=$?
    [ $status -ne 0 ] || die "cbt-filterd $*: exit status 0, expected failure"
    [ $status -ne 124 ] || die "cbt-filterd $*: started instead of failing"
    lines=$(wc -l <"$err")
    [ "$lines" -eq 1 ] ||
        die "cbt-filterd $*: $lines lines on stderr, expected 1: $(cat "$err")"
    grep -qF -- "$want" "$err" ||
        die "cbt-filterd $*: stderr does not mention '$want': $(cat "$err")"
    [ ! -e "$tmp/cli-$n.pid" ] || die "cbt-filterd $*: left a pid file"
}

s=$tmp/cli.sock
cli_error "$tmp/missing.img" --image "$tmp/missing.img" --socket "$s"
[ ! -e "$s" ] || die "failed start left $s behind"
cli_error "$tmp" --image "$tmp" --socket "$s"
cli_error --no-such-flag --image "$disk" --socket "$s" --no-such-flag
cli_error image --socket "$s"
cli_error bogus --image "$disk" --socket "$s" --cache bogus
cli_error qcow2 --image "$disk" --socket "$s" --format qcow2
cli_error threads --image "$disk" --socket "$s" --threads -1
cli_error abc --image "$disk" --socket "$s" --threads abc
cli_error not-a-port --image "$disk" --listen 127.0.0.1:not-a-port
[ ! -e "$s" ] || die "failed starts left $s behind"

# Neither --socket nor --listen: refused (no default listener).
status=0
timeout 30 "$CBT_FILTERD" --image "$disk" </dev/null >/dev/null 2>"$tmp/nosock.err" ||
    status=$?
[ $status -ne 0 ] && [ $status -ne 124 ] ||
    die "cbt-filterd without --socket/--listen: status $status, expected failure"
[ "$(wc -l <"$tmp/nosock.err")" -eq 1 ] ||
    die "cbt-filterd without --socket/--listen: stderr: $(cat "$tmp/nosock.err")"

# A live daemon on the socket: the second one must refuse and must not
# unlink or steal the first one's socket.
start_filterd --image "$disk" --socket "$s" --verbose --threads 2
cli_error "$s" --image "$disk" --socket "$s"
[ -S "$s" ] || die "the refused daemon removed the live socket $s"
[ "$(nbdinfo --size "$uri")" = 1048576 ] || die "first daemon disturbed"
stop_filterd
[ ! -e "$s" ] || die "socket $s left after SIGTERM"
[ ! -e "$pidfile" ] || die "pid file $pidfile left after SIGTERM"

# A stale socket file (nobody listening, as after a crash) is replaced.
rm -f "$s"
"$PYTHON" -c 'import socket, sys
socket.socket(socket.AF_UNIX).bind(sys.argv[1])' "$s"
[ -S "$s" ] || die "could not create a stale socket"
start_filterd --image "$disk" --socket "$s"
[ "$(nbdinfo --size "$uri")" = 1048576 ] || die "daemon on a stale socket path not serving"
stop_filterd

# A regular file in the way is not a socket: refused, and left alone.
rm -f "$s"
echo precious >"$s"
cli_error "$s" --image "$disk" --socket "$s"
[ "$(cat "$s")" = precious ] || die "cbt-filterd clobbered the regular file $s"
