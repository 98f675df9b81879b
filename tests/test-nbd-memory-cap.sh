#!/usr/bin/env bash
# --max-memory bounds the request buffers of all clients together, and
# idle pooled buffers go back to the system (issue 12, defect 8).
#
#   - 6 clients each queue 8 READs of 32 MiB and never read a reply.  Per
#     connection the daemon stops at 64 MiB, so without a daemon-wide cap
#     they pin 384 MiB; with --max-memory 64M the daemon's peak RSS grows
#     by well under that.
#   - A well-behaved client (qemu-io) is still served: the clients that
#     hold the memory without reading are closed after 30 s of no progress
#     while it waits, with a log line; the daemon keeps running.
#   - Once the memory is given back and nothing runs, the pooled buffers
#     are freed: RSS falls back near where it started.

source "$(dirname "$0")/functions.sh"
requires qemu-io

# Under AddressSanitizer freed memory sits in its quarantine and never
# goes back to the system: turn that off for this daemon.
if [ -n "${ASAN_OPTIONS:-}" ] || ldd "$CBT_FILTERD" 2>/dev/null | grep -q libasan; then
    FILTERD_PREFIX="env ASAN_OPTIONS=${ASAN_OPTIONS:-}:quarantine_size_mb=0"
fi
start_filterd --image memory:1G --threads 2 --max-memory 64M
FILTERD_PREFIX=

rss_kib() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$pid/status"; }
base=$(rss_kib VmRSS)

cat >"$tmp/hog.py" <<'PYEOF'
import sys, time
import nbdraw
held = []
for i in range(6):
    s = nbdraw.negotiated(sys.argv[1])
    for k in range(8):
        s.sendall(nbdraw.request(nbdraw.CMD_READ, k << 25, 32 << 20, cookie=k))
    held.append(s)
print("ready", flush=True)
time.sleep(3600)
PYEOF
"$PYTHON" "$tmp/hog.py" "$sock" >"$tmp/hog.out" 2>&1 &
hog=$!
cleanup_fn _kill_quietly "$hog"
wait_for_word "$tmp/hog.out" ready "$hog"
# Let the daemon take what it will (the reads are served from RAM).
sleep 3
peak=$(rss_kib VmHWM)
grown=$(( (peak - base) / 1024 ))
echo "RSS at start $((base / 1024)) MiB, peak $((peak / 1024)) MiB (+$grown MiB)"
(( grown < 160 )) ||
    die "6 clients that do not read their replies grew the daemon by $grown MiB with --max-memory 64M"

# A client that reads its replies gets its turn.  (A hang guard, not a
# timing check: the stall period is 30 s.)
timeout 120 qemu-io -f raw -c "read -P 0 0 64k" "$uri" >"$tmp/qio.out" 2>&1 ||
    { cat "$tmp/qio.out"; die "qemu-io read was not served while memory was held"; }
grep -q "has not taken a byte of its replies for 30 s" "$log" ||
    die "no log line for the clients that held memory without reading"
kill -0 "$pid" || die "daemon died"
kill "$hog"
wait "$hog" 2>/dev/null || true

# Idle: pooled buffers are freed within a few seconds.
back=
for (( i = 0; i < 100; i++ )); do
    now=$(rss_kib VmRSS)
    if (( (now - base) / 1024 < 32 )); then
        back=1
        break
    fi
    sleep 0.1
done
[ -n "$back" ] ||
    die "RSS stayed at $((now / 1024)) MiB (started at $((base / 1024)) MiB): pooled buffers not returned"
qio -f raw -c "write -P 7 1M 1M" -c "read -P 7 1M 1M" "$uri"
stop_filterd
echo "memory cap: OK"
