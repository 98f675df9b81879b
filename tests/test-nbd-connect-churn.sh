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
import struct, sys
from nbdraw import CMD_DISC, CMD_READ, CMD_WRITE, connect, negotiated, recvn, request, reset
path = sys.argv[1]

for i in range(500):                 # clean: a read, then DISC
    s = negotiated(path)
    s.sendall(request(CMD_READ, 4096 * i, 4096, cookie=i))
    assert struct.unpack(">IIQ", recvn(s, 16))[1] == 0, "read failed"
    recvn(s, 4096)
    s.sendall(request(CMD_DISC, 0, 0))
    s.close()
for i in range(500):                 # dropped during negotiation
    s = connect(path)
    if i % 2:
        recvn(s, 18)
        s.sendall(struct.pack(">I", 3) + b"IHAVE")
    reset(s)
for i in range(500):                 # reset right after negotiating
    reset(negotiated(path))
for i in range(500):                 # reset in the middle of a WRITE
    s = negotiated(path)
    s.sendall(request(CMD_WRITE, 0, 65536, cookie=i) + b"w" * 1000)
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
