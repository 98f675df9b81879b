#!/usr/bin/env bash
# Hardening (issue 12, defects 6 and 7):
#   - control clients that connect and send nothing cannot lock `status`
#     and checkpoints out: 20 idle ones (16 were enough before) leave
#     room, and past the limit a new client gets an error line, not a
#     hang;
#   - a request line starting with NUL gets an error reply;
#   - checkpoint ids must be exactly 16 hex digits (no sign, blank, 0x);
#   - --handshake-timeout bounds the whole NBD negotiation: a client that
#     trickles a byte every 0.3 s is dropped at the deadline, not kept
#     forever.

source "$(dirname "$0")/functions.sh"
requires jq nbdinfo

disk=$tmp/disk.img
csock=$tmp/ctl.sock
truncate -s 16M "$disk"
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --control "$csock" \
    --handshake-timeout 2

# hold N SECONDS: N idle control connections held open for SECONDS.
hold()
{
    "$PYTHON" - "$csock" "$1" "$2" <<'PYEOF' &
import socket, sys, time
socks = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); socks.append(s)
print("held", flush=True)
time.sleep(float(sys.argv[3]))
PYEOF
    hold_pid=$!
}

hold 20 15
sleep 1
r=$(timeout 10 "$PYTHON" - "$csock" <<'PYEOF'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(8); s.connect(sys.argv[1])
s.sendall(b'{"execute":"status"}\n')
print(s.makefile().readline().strip())
PYEOF
) || true
json_true '.return.size == 16777216' "$r" ||
    die "status with 20 idle control clients: got '$r'"
kill "$hold_pid" 2>/dev/null; wait "$hold_pid" 2>/dev/null || true

# Past the limit: an error line at once.
hold 64 15
sleep 1.5
r=$(timeout 10 "$PYTHON" - "$csock" <<'PYEOF'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(8); s.connect(sys.argv[1])
print(s.makefile().readline().strip())
PYEOF
) || true
grep -q "too many control clients" <<<"$r" || die "client past the limit got '$r'"
kill "$hold_pid" 2>/dev/null; wait "$hold_pid" 2>/dev/null || true
sleep 0.5

# A NUL line, and ids strtoull would take.
r=$("$PYTHON" - "$csock" <<'PYEOF'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
s.sendall(b'\0{"execute":"status"}\n')
print(s.makefile().readline().strip())
PYEOF
)
[ "$(jq -r .error.class <<<"$r")" = BadRequest ] || die "NUL line: got '$r'"
for id in -000000000000001 " 00000000000000a" 0x0000000000000a +00000000000000a; do
    r=$(ctl "$csock" "{\"execute\":\"checkpoint-commit\",\"arguments\":{\"checkpoint\":\"$id\"}}")
    [ "$(jq -r .error.class <<<"$r")" = BadRequest ] ||
        die "checkpoint id '$id' accepted: $r"
done
r=$(ctl "$csock" '{"execute":"checkpoint-commit","arguments":{"checkpoint":"00000000000000aB"}}')
[ "$(jq -r .error.class <<<"$r")" = NoCheckpoint ] || die "a valid id was refused: $r"

# A negotiation that trickles: one byte every 0.3 s for up to 15 s; the
# daemon must drop it at the 2 s deadline (well before it is done).
"$PYTHON" - "$sock" <<'PYEOF' || die "a trickling negotiation was not cut at the deadline"
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect(sys.argv[1])
s.recv(18)                                    # the server's greeting
msg = b"\0\0\0\3" + b"IHAVEOPT" + b"\0\0\0\1" + b"\0\0\x10\0" + b"x" * 4096
start = time.monotonic()
for i in range(50):
    try:
        s.send(msg[i:i + 1])
    except OSError:
        break
    time.sleep(0.3)
    s.setblocking(False)
    try:
        if s.recv(1) == b"":
            break
    except BlockingIOError:
        pass
    s.setblocking(True)
else:
    sys.exit("still connected after %.1f s" % (time.monotonic() - start))
PYEOF
grep -q "negotiation timed out" "$log" || die "no log line for the cut negotiation"
nbdinfo "$uri" >/dev/null 2>&1 || die "the daemon does not serve after the abuse"
stop_filterd
echo "control and negotiation abuse: OK"
