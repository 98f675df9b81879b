#!/usr/bin/env bash
# 2000 connections, 1000 of them ended abruptly, leak nothing (issue 12):
# after 500 clean sessions (negotiate, read, DISC), 500 drops during
# negotiation, 500 resets right after negotiating and 500 resets in the
# middle of a WRITE payload, the daemon has the same open descriptors and
# threads as before, serves, and stops cleanly (under ASan: no leak).

source "$(dirname "$0")/functions.sh"
requires nbdinfo

start_filterd --image memory:64M --threads 2 --control "$tmp/ctl"
clients() { ctl "$tmp/ctl" '{"execute":"status"}' | jq -r '.return.clients'; }
fds() { find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 | wc -l; }
threads() { awk '$1 == "Threads:" { print $2 }' "/proc/$pid/status"; }

# Warm up once (the first client may create lazily made things).
nbdinfo --size "$uri" >/dev/null
fd0=$(fds)
th0=$(threads)

"$PYTHON" - "$sock" <<'PYEOF' || die "the churn client failed"
import socket, struct, sys
path = sys.argv[1]
MAGIC_OPT = 0x49484156454F5054

def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise SystemExit("server closed early")
        b += c
    return b

def negotiate():
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    recvn(s, 18)
    s.sendall(struct.pack(">I", 3))
    s.sendall(struct.pack(">QII", MAGIC_OPT, 1, 0))          # EXPORT_NAME ""
    recvn(s, 10)
    return s

def reset(s):
    # SO_LINGER 0: close without a clean shutdown.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()

for i in range(500):                 # clean: a read, then DISC
    s = negotiate()
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, 4096 * i, 4096))
    h = recvn(s, 16)
    assert struct.unpack(">IIQ", h)[1] == 0, "read failed"
    recvn(s, 4096)
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))
    s.close()
for i in range(500):                 # dropped during negotiation
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    if i % 2:
        s.recv(18)
        s.sendall(struct.pack(">I", 3) + b"IHAVE")
    reset(s)
for i in range(500):                 # reset right after negotiating
    reset(negotiate())
for i in range(500):                 # reset in the middle of a WRITE
    s = negotiate()
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, i, 0, 65536) + b"w" * 1000)
    reset(s)
PYEOF

# The daemon sees the last closes asynchronously.
for (( i = 0; i < 100; i++ )); do
    [ "$(clients)" = 0 ] && [ "$(fds)" = "$fd0" ] && break
    sleep 0.1
done
[ "$(clients)" = 0 ] || die "status still counts $(clients) clients"
[ "$(fds)" = "$fd0" ] || { ls -l "/proc/$pid/fd" >&2; die "open descriptors: $fd0 before, $(fds) after"; }
[ "$(threads)" = "$th0" ] || die "threads: $th0 before, $(threads) after"
nbdinfo --size "$uri" >/dev/null || die "not serving after the churn"
stop_filterd
echo "connect churn: OK ($fd0 descriptors, $th0 threads before and after)"
