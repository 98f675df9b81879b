#!/usr/bin/env bash
# A client that sends requests and never reads the replies cannot keep the
# daemon from stopping: after SIGTERM it gives the client a grace period,
# then closes the connection, flushes and exits 0 with its socket removed.
# Meanwhile other clients are still served.

source "$(dirname "$0")/functions.sh"
requires qemu-io timeout

disk=$tmp/disk.img
truncate -s 64M "$disk"
start_filterd --image "$disk"

# Negotiate (fixed newstyle, NBD_OPT_EXPORT_NAME), then queue 64 reads of
# 1 MiB and stop reading: the socket buffers fill and the server's sends
# stall.  Hold the socket open until killed.
"$PYTHON" - "$sock" <<'PYEOF' &
import socket, struct, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
def recvn(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            sys.exit("server closed during negotiation")
        b += c
    return b
recvn(18)
s.sendall(struct.pack(">I", 3))                       # fixed newstyle, no zeroes
s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 0))
recvn(10)
for i in range(64):
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, 0, 1 << 20))
print("stuck client ready", flush=True)
time.sleep(600)
PYEOF
stuck=$!
cleanup_fn kill "$stuck"
sleep 1

# Others are still served while that client hogs its connection.
qio -f raw "$uri" -c 'write -P 7 0 64k' -c 'read -P 7 0 64k'

kill -TERM "$pid"
for (( i = 0; i < 300; i++ )); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$pid" 2>/dev/null && die "daemon still running 30 s after SIGTERM with a stuck client"
status=0
wait "$pid" || status=$?
[ $status -eq 0 ] || die "daemon exited with status $status"
[ ! -e "$sock" ] || die "socket left behind"
grep -q "did not take its replies" "$log" || die "no message about the stuck client"
