#!/usr/bin/env bash
# SIGTERM in the middle of a write workload: the daemon exits 0, removes
# its socket and pid file, and every write it acknowledged is in the file.
# SIGTERM with an idle client connected and SIGINT also end it cleanly.

source "$(dirname "$0")/functions.sh"
requires env
requires_python_nbd

bs=65536
disk=$tmp/disk.img
truncate -s 256M "$disk"

start_filterd --image "$disk"
"$PYTHON" "$testsdir/nbd-shutdown-writer.py" "$uri" "$pid" "$tmp/acked" 64 $bs \
    >"$tmp/writer.out" || die "writer failed: $(cat "$tmp/writer.out")"
cat "$tmp/writer.out"
stop_filterd_after_signal()
{
    local i status=0
    for (( i = 0; i < 600; i++ )); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && die "daemon still running 60 s after the signal"
    wait "$pid" || status=$?
    [ $status -eq 0 ] || { cat "$log" >&2; die "daemon exited with status $status, expected 0"; }
    [ ! -e "$sock" ] || die "socket $sock left behind"
    [ ! -e "$pidfile" ] || die "pid file $pidfile left behind"
}
stop_filterd_after_signal
grep -q 'done=True' "$tmp/writer.out" &&
    echo "note: the writer finished before the daemon stopped serving"

nacked=$(wc -l <"$tmp/acked")
[ "$nacked" -ge 64 ] || die "only $nacked writes acknowledged"
"$PYTHON" "$testsdir/nbd-shutdown-writer.py" --verify "$disk" "$tmp/acked" $bs ||
    die "acknowledged writes missing from the file"

# An idle connected client does not keep the daemon alive after SIGTERM.
start_filterd --image "$disk"
"$PYTHON" -c '
import signal, sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
print("connected", flush=True)
signal.pause()' "$uri" >"$tmp/idle.out" 2>&1 &
idle=$!
cleanup_fn _kill_daemon "$idle"
for (( i = 0; i < 600; i++ )); do
    grep -q connected "$tmp/idle.out" && break
    sleep 0.1
done
grep -q connected "$tmp/idle.out" || die "idle client did not connect"
kill -TERM "$pid"
stop_filterd_after_signal

# SIGINT (with the default disposition restored: a background job of a
# non-interactive shell starts with SIGINT ignored).
FILTERD_PREFIX="env --default-signal=INT" start_filterd --image "$disk"
kill -INT "$pid"
stop_filterd_after_signal
