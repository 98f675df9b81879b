#!/usr/bin/env bash
# Idle and slow clients cannot lock a new client out (issue 12).
#
#   - 300 unix and 200 TCP connections that send nothing, stop in the
#     middle of an option, or trickle, are held open (the handshake
#     timeout is long, so none of them expires during the test); a new
#     client (nbdinfo, then qemu-io writing) is still served on both
#     transports, and so is a client that negotiated and then stalled in
#     the middle of a WRITE payload on the only worker thread.
#   - --max-clients N: with N clients connected the next one is refused
#     and logged; once they leave, clients are served again.
#   - The soft limit on open files was raised to the hard limit.

source "$(dirname "$0")/functions.sh"
requires nbdinfo qemu-io

hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && (( hard < 700 )); then
    skip "the hard limit on open files ($hard) is too low for 500 clients"
fi
# The test's own client needs the descriptors too.
ulimit -Sn "$hard"

port=$(free_tcp_port)
start_filterd --image memory:64M --socket "$tmp/nbd.sock" \
    --listen 127.0.0.1:"$port" --handshake-timeout 120 --threads 1
unix_uri="nbd+unix:///?socket=$tmp/nbd.sock"
tcp_uri="nbd://127.0.0.1:$port/"

# RLIMIT_NOFILE: soft raised to hard.
limits=$(awk '/Max open files/ { print $4, $5 }' "/proc/$pid/limits")
read -r soft_d hard_d <<<"$limits"
[ "$soft_d" = "$hard_d" ] ||
    die "daemon's open-file limits are soft $soft_d, hard $hard_d: soft not raised"

# The idle clients: a python process holding them, which says "ready"
# on its stdout once all are connected, then sleeps until killed.
cat >"$tmp/idle.py" <<'PYEOF'
import struct, sys, time
import nbdraw
path, port = sys.argv[1], int(sys.argv[2])
held = []
def one(where, i):
    s = nbdraw.connect(where)
    mode = i % 3
    if mode == 1:
        # Client flags, then half an option header, then silence.
        s.sendall(struct.pack(">I", 3) + b"IHAVEOPT")
    elif mode == 2:
        # A whole option header announcing 1000 bytes, and 10 of them.
        s.sendall(struct.pack(">I", 3) + nbdraw.option(7, b"x" * 1000)[:26])
    held.append(s)
for i in range(300):
    one(path, i)
for i in range(200):
    one(port, i)
print("ready", len(held), flush=True)
time.sleep(3600)
PYEOF
"$PYTHON" "$tmp/idle.py" "$tmp/nbd.sock" "$port" >"$tmp/idle.out" 2>&1 &
idle=$!
cleanup_fn _kill_quietly "$idle"
wait_for_word "$tmp/idle.out" "ready 500" "$idle"

# A client that negotiated and then stops in the middle of a WRITE payload
# (with --threads 1, all connections share its worker).
"$PYTHON" - "$tmp/nbd.sock" >"$tmp/stall.out" 2>&1 <<'PYEOF' &
import sys, time
import nbdraw
s = nbdraw.negotiated(sys.argv[1])
# WRITE of 1 MiB at 0, 100 bytes of payload, then nothing.
s.sendall(nbdraw.request(nbdraw.CMD_WRITE, 0, 1 << 20, cookie=1) + b"s" * 100)
print("stalled", flush=True)
time.sleep(3600)
PYEOF
stall=$!
cleanup_fn _kill_quietly "$stall"
wait_for_word "$tmp/stall.out" stalled "$stall"

# New clients on both transports, while all of the above are held.
nbdinfo --size "$unix_uri" >"$tmp/size.unix" 2>"$tmp/err.unix" ||
    die "nbdinfo over unix refused with 500 idle clients held: $(cat "$tmp/err.unix")"
[ "$(cat "$tmp/size.unix")" = $((64 << 20)) ] || die "nbdinfo over unix: wrong size"
nbdinfo --size "$tcp_uri" >"$tmp/size.tcp" 2>"$tmp/err.tcp" ||
    die "nbdinfo over TCP refused with 500 idle clients held: $(cat "$tmp/err.tcp")"
qio -f raw -c "write -P 0x5a 4M 64k" "$unix_uri" >/dev/null ||
    die "qemu-io write over unix failed with idle clients held"
qio -f raw -c "read -P 0x5a 4M 64k" "$tcp_uri" >/dev/null ||
    die "qemu-io read over TCP does not see the write"
kill -0 "$idle" 2>/dev/null || die "the idle clients were dropped"
# SIGTERM with every idle negotiation still open: they are cut, and the
# daemon exits 0 (under ASan: without a leak).
kill "$stall"
wait "$stall" 2>/dev/null || true
stop_filterd
kill "$idle"
wait "$idle" 2>/dev/null || true

# --max-clients: 5 idle clients fill it; the next one is refused and
# logged, the daemon keeps running; when they leave, clients are served.
start_filterd --image memory:16M --max-clients 5 --handshake-timeout 120
cat >"$tmp/five.py" <<'PYEOF'
import sys, time
import nbdraw
held = []
for i in range(5):
    s = nbdraw.connect(sys.argv[1])
    nbdraw.recvn(s, 18)
    held.append(s)
print("ready", flush=True)
time.sleep(3600)
PYEOF
"$PYTHON" "$tmp/five.py" "$sock" >"$tmp/five.out" 2>&1 &
five=$!
cleanup_fn _kill_quietly "$five"
wait_for_word "$tmp/five.out" ready "$five"
if nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1; then
    die "a sixth client was served with --max-clients 5"
fi
grep -q "refused: 5 clients connected" "$log" || die "no log line for the refused client"
kill -0 "$pid" || die "the daemon died refusing a client"
kill "$five"
wait "$five" 2>/dev/null || true
# The daemon notices the closed connections when their receives complete.
ok=
for (( i = 0; i < 50; i++ )); do
    if nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1; then
        ok=1
        break
    fi
    sleep 0.1
done
[ -n "$ok" ] || die "clients still refused after the idle ones left"
stop_filterd
echo "idle clients: OK"
