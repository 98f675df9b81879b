#!/usr/bin/env bash
# Readiness and status for Type=notify (filterd/sd-notify.c): with
# NOTIFY_SOCKET pointing at a datagram socket of the test (as systemd sets
# it), cbt-filterd sends
#   READY=1 (its first message) only once it serves: at that moment a
#     client gets the NBD greeting;
#   STATUS= lines that follow the clients and a checkpoint in progress;
#   STOPPING=1 when SIGTERM begins the orderly stop (its last message);
#   STATUS=failed: REASON, and no READY=1, when it cannot start;
# and an abstract socket name (@name) works as well as a path.

source "$(dirname "$0")/functions.sh"
requires jq
requires_python_nbd

disk=$tmp/disk.img
truncate -s 64M "$disk"

# collect ADDR OUT NBDSOCK: receive datagrams on ADDR (a path or @name),
# one line each in OUT (newlines as '|'); on READY=1 check at once that
# NBDSOCK greets a client, appending " [serving:yes]" or " [serving:no]".
collect_py='
import socket, sys
addr, out, nbdsock = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("\0" + addr[1:] if addr.startswith("@") else addr)
f = open(out, "a")
f.write("bound\n")
f.flush()
while True:
    msg = s.recv(65536).decode()
    line = msg.replace("\n", "|")
    if "READY=1" in msg.split("\n"):
        try:
            c = socket.socket(socket.AF_UNIX)
            c.settimeout(5)
            c.connect(nbdsock)
            ok = c.recv(8) == b"NBDMAGIC"
            c.close()
        except OSError:
            ok = False
        line += " [serving:%s]" % ("yes" if ok else "no")
    f.write(line + "\n")
    f.flush()
'
ncollect=0
# start_collector ADDR NBDSOCK: sets $msgs, the file the messages go to.
start_collector()
{
    local i
    ncollect=$((ncollect + 1))
    msgs=$tmp/notify-$ncollect.txt
    "$PYTHON" -c "$collect_py" "$1" "$msgs" "$2" 2>"$msgs.err" &
    cleanup_fn _kill_daemon $!
    for (( i = 0; i < 300; i++ )); do
        grep -q '^bound$' "$msgs" 2>/dev/null && return 0
        sleep 0.1
    done
    cat "$msgs.err" >&2
    die "the notify collector did not bind $1"
}

# wait_msg PATTERN [AFTER]: a message after line AFTER (default 1, the
# "bound" line) matches the extended regexp PATTERN (bounded, 30 s).
wait_msg()
{
    local i
    for (( i = 0; i < 300; i++ )); do
        tail -n +"$(( ${2:-1} + 1 ))" "$msgs" | grep -qE -- "$1" && return 0
        sleep 0.1
    done
    echo "--- messages received:" >&2
    cat "$msgs" >&2
    die "no notification matching '$1'"
}
nmsgs() { wc -l <"$msgs"; }

### A path socket: the whole life of a daemon.
sock=$tmp/nbd.sock
csock=$tmp/ctl.sock
start_collector "$tmp/notify.sock" "$sock"
FILTERD_PREFIX="env NOTIFY_SOCKET=$tmp/notify.sock" start_filterd \
    --image "$disk" --format raw --bitmap "$tmp/disk.bm" --socket "$sock" --control "$csock"
wait_msg 'READY=1'
first=$(sed -n 2p "$msgs")
[[ $first == *"READY=1"* ]] || die "the first notification is '$first', expected READY=1"
[[ $first == *"[serving:yes]"* ]] || die "READY=1 was sent before the daemon served: $first"
[[ $first == *"STATUS=serving $disk, 0 clients"* ]] || die "no STATUS with READY=1: $first"

# A client that stays connected shows in STATUS.
n=$(nmsgs)
"$PYTHON" -c '
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
time.sleep(120)' "$uri" &
client=$!
cleanup_fn _kill_quietly "$client"
wait_msg "^STATUS=serving $disk, 1 client$" "$n"
n=$(nmsgs)
kill "$client"
wait "$client" 2>/dev/null || true
wait_msg "^STATUS=serving $disk, 0 clients$" "$n"

# A checkpoint in progress shows in STATUS, and its end too.
n=$(nmsgs)
r=$(ctl "$csock" '{"execute":"checkpoint-begin"}')
json_true '.return' "$r" || die "checkpoint-begin: $r"
wait_msg "^STATUS=serving $disk, 0 clients, checkpoint in progress$" "$n"
n=$(nmsgs)
r=$(ctl "$csock" '{"execute":"checkpoint-abort"}')
json_true '.return' "$r" || die "checkpoint-abort: $r"
wait_msg "^STATUS=serving $disk, 0 clients$" "$n"

stop_filterd
last=$(tail -n 1 "$msgs")
[[ $last == "STOPPING=1|STATUS=stopping"* ]] || die "the last notification is '$last', expected STOPPING=1"
[ "$(grep -c 'READY=1' "$msgs")" -eq 1 ] || die "READY=1 sent more than once"

### An abstract socket name.
name=@cbt-test-notify-$$-$RANDOM
start_collector "$name" "$sock"
FILTERD_PREFIX="env NOTIFY_SOCKET=$name" start_filterd \
    --image "$disk" --format raw --socket "$sock"
wait_msg 'READY=1'
grep -q 'READY=1.*\[serving:yes\]' "$msgs" || die "READY=1 on $name before serving: $(cat "$msgs")"
stop_filterd
wait_msg 'STOPPING=1'

### A daemon that cannot start says why, and is never ready.
start_collector "$tmp/notify-fail.sock" "$sock"
head -c 65536 /dev/urandom >"$tmp/garbage.bm"
rc=0
env NOTIFY_SOCKET="$tmp/notify-fail.sock" "$CBT_FILTERD" --image "$disk" --format raw \
    --bitmap "$tmp/garbage.bm" --socket "$sock" </dev/null >"$tmp/fail.log" 2>&1 || rc=$?
[ "$rc" -eq 1 ] || { cat "$tmp/fail.log" >&2; die "daemon with a garbage bitmap: exit $rc, expected 1"; }
wait_msg "^STATUS=failed: $tmp/garbage.bm"
! grep -q 'READY=1' "$msgs" || die "READY=1 sent by a daemon that failed to start"
exit 0
