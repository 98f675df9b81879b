#!/usr/bin/env bash
# Socket activation (filterd/sd-activation.c): cbt-filterd serves on
# listening sockets it inherits (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES),
# with the descriptor names the .socket units give (systemd/), so that
#
#  1. under systemd-socket-activate, which starts the daemon only when the
#     first client connects, that client -- connected before the daemon
#     ran -- is served, and the control socket works for a real backup;
#  2. across a restart nothing is lost: a client that connects while no
#     daemon runs waits in the socket's backlog and is served by the next
#     daemon (a small service manager below holds the sockets, as systemd
#     does, and starts the daemon with the unit's own ExecStart line);
#  3. sockets that do not fit are refused at start with a message: an
#     unknown name, a control socket on TCP, --socket given as well, and
#     variables meant for another process (LISTEN_PID) are ignored.

source "$(dirname "$0")/functions.sh"
requires systemd-socket-activate qemu-io jq
requires_python_nbd
[ -x "$CBT_CLI" ] || die "cbt CLI $CBT_CLI not found (build it: ninja -C build)"

units=$CBT_SOURCE_DIR/systemd
# The names the units give the sockets: the daemon must understand them.
nbd_name=$(sed -n 's/^FileDescriptorName=//p' "$units/cbt-filterd@.socket.in")
ctl_name=$(sed -n 's/^FileDescriptorName=//p' "$units/cbt-filterd-control@.socket.in")
[ "$nbd_name" = nbd ] && [ "$ctl_name" = control ] ||
    die "the socket units name their sockets '$nbd_name' and '$ctl_name', expected nbd and control"

disk=$tmp/disk.img
bm=$tmp/disk.bm
truncate -s 64M "$disk"

# wait_for DESC CMD...: poll CMD (bounded, 30 s) until it succeeds.
wait_for()
{
    local desc=$1 i
    shift
    for (( i = 0; i < 300; i++ )); do
        "$@" && return 0
        sleep 0.1
    done
    die "timed out waiting for $desc"
}

### 1. systemd-socket-activate: the first client starts the daemon.
nbd=$tmp/nbd.sock ctl=$tmp/ctl.sock
systemd-socket-activate -l "$nbd" -l "$ctl" --fdname="$nbd_name:$ctl_name" \
    "$CBT_FILTERD" --image "$disk" --format raw --bitmap "$bm" \
    --pid-file "$tmp/pid" </dev/null >"$tmp/sa.log" 2>&1 &
sa=$!
_daemon_log[$sa]=$tmp/sa.log
cleanup_fn _kill_daemon "$sa"
wait_for "systemd-socket-activate to listen" test -S "$ctl"
sleep 0.5
# Nothing connected yet: no daemon (the same process execs it later).
[ "$(cat "/proc/$sa/comm")" != cbt-filterd ] && [ ! -e "$tmp/pid" ] ||
    die "cbt-filterd runs before any client connected"
# This client connects to a socket no daemon serves yet.
uri="nbd+unix:///?socket=$nbd"
qio -f raw "$uri" -c 'write -P 0x5a 0 1M'
[ "$(cat "/proc/$sa/comm")" = cbt-filterd ] || die "the daemon did not start"
wait_for "the pid file" test -s "$tmp/pid"
[ "$(cat "$tmp/pid")" = "$sa" ] || die "pid file holds $(cat "$tmp/pid"), expected $sa"
grep -q "sockets from the service manager" "$tmp/sa.log" ||
    { _show_log "$tmp/sa.log"; die "the daemon did not log its inherited sockets"; }
st=$(ctl "$ctl" '{"execute":"status"}')
json_true '.return.bitmap."dirty-bytes" == 1048576' "$st" ||
    die "status on the inherited control socket: $st"
expect_rc 0 cbt backup --socket "$nbd" --control "$ctl" --repo "$tmp/repo"
qio -f raw "$uri" -c 'read -P 0x5a 0 1M'
kill -TERM "$sa"
rc=0
wait "$sa" || rc=$?
[ "$rc" -eq 0 ] || { _show_log "$tmp/sa.log"; die "daemon exited with $rc after SIGTERM"; }
# The sockets are the manager's: the daemon leaves them alone.
[ -S "$nbd" ] && [ -S "$ctl" ] || die "the daemon removed the inherited sockets"

### 2. A small service manager: holds the sockets across daemon restarts.
# manager [--once] [--wrong-pid] NAME=PATH|NAME=tcp:HOST:PORT... -- CMD...
# listens on each address, prints "listening"; then starts CMD with the
# sockets as descriptors 3... and LISTEN_* set (with --once at once, then
# exits with CMD's status; otherwise on each SIGUSR1), printing
# "started PID" and "exited PID STATUS".  CMD's output goes to
# $MANAGER_LOG.
manager_py='
import os, signal, socket, subprocess, sys
args = sys.argv[1:]
sep = args.index("--")
opts, cmd = args[:sep], args[sep + 1:]
once, wrong_pid = "--once" in opts, "--wrong-pid" in opts
names, socks = [], []
for o in opts:
    if o.startswith("--"):
        continue
    name, addr = o.split("=", 1)
    if addr.startswith("tcp:"):
        host, port = addr[4:].rsplit(":", 1)
        s = socket.socket(socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, int(port)))
    else:
        s = socket.socket(socket.AF_UNIX)
        s.bind(addr)
    s.listen(128)
    names.append(name)
    socks.append(s)
# Descriptors 3, 4, ...: move them out of the way first.
high = [os.dup2(s.fileno(), 100 + i) for i, s in enumerate(socks)]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.set_inheritable(3 + i, True)
n = len(socks)
env = dict(os.environ, LISTEN_FDS=str(n), LISTEN_FDNAMES=":".join(names))
log = open(os.environ["MANAGER_LOG"], "ab")
sigs = {signal.SIGUSR1, signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
def start():
    pid = "1" if wrong_pid else "$$"
    p = subprocess.Popen(["/bin/sh", "-c", "export LISTEN_PID=%s; exec \"$@\"" % pid, "sh"] + cmd,
                         env=env, pass_fds=range(3, 3 + n), stdin=subprocess.DEVNULL,
                         stdout=log, stderr=log,
                         preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, set()))
    print("started", p.pid, flush=True)
    return p
print("listening", flush=True)
if once:
    p = start()
    p.wait()
    print("exited", p.pid, p.returncode, flush=True)
    sys.exit(p.returncode if p.returncode >= 0 else 128 - p.returncode)
child = None
while True:
    sig = signal.sigwait(sigs)
    if sig == signal.SIGUSR1 and child is None:
        child = start()
    elif sig == signal.SIGCHLD:
        if child is not None and child.poll() is not None:
            print("exited", child.pid, child.returncode, flush=True)
            child = None
    elif sig in (signal.SIGTERM, signal.SIGINT):
        if child is not None:
            child.kill()
            child.wait()
        break
'

# The daemon as the unit starts it: ExecStart with the variables of a
# configuration file expanded as systemd does (${VAR}: one word, $VAR:
# split at spaces), the installed path replaced by the one under test.
IMAGE=$disk
BITMAP=$bm
FILTERD_ARGS="--format raw --pid-file $tmp/m.pid"
execstart=$(sed -n 's/^ExecStart=//p' "$CBT_BUILD_DIR/systemd/cbt-filterd@.service")
[ -n "$execstart" ] || die "no ExecStart in $CBT_BUILD_DIR/systemd/cbt-filterd@.service"
read -ra words <<<"$execstart"
daemon=("$CBT_FILTERD")
for w in "${words[@]:1}"; do
    case $w in
        '${'*'}') v=${w:2:${#w}-3}; daemon+=("${!v}") ;;
        '$'*) v=${w:1}; read -ra split <<<"${!v}"; daemon+=("${split[@]}") ;;
        *) daemon+=("$w") ;;
    esac
done

export MANAGER_LOG=$tmp/manager-daemons.log
mnbd=$tmp/m-nbd.sock mctl=$tmp/m-ctl.sock
"$PYTHON" -c "$manager_py" "$nbd_name=$mnbd" "$ctl_name=$mctl" -- "${daemon[@]}" \
    >"$tmp/manager.out" 2>&1 &
mgr=$!
_daemon_log[$mgr]=$MANAGER_LOG
cleanup_fn _kill_daemon "$mgr"
wait_for "the manager to listen" grep -q listening "$tmp/manager.out"
muri="nbd+unix:///?socket=$mnbd"

started_at_least() { [ "$(grep -c '^started' "$tmp/manager.out")" -ge "$1" ]; }
# start_daemon: SIGUSR1 the manager; $dpid is the new daemon, serving.
nstarted=0
start_daemon()
{
    rm -f "$tmp/m.pid"
    kill -USR1 "$mgr"
    nstarted=$((nstarted + 1))
    wait_for "daemon $nstarted to start" started_at_least "$nstarted"
    dpid=$(grep '^started' "$tmp/manager.out" | tail -n 1 | cut -d' ' -f2)
    cleanup_fn _kill_quietly "$dpid"
    wait_for "daemon $dpid's pid file" test -s "$tmp/m.pid"
}
# stop_daemon: SIGTERM $dpid; it must exit 0 while the manager stays.
stop_daemon()
{
    kill -TERM "$dpid"
    wait_for "daemon $dpid to exit" grep -q "^exited $dpid " "$tmp/manager.out"
    grep -q "^exited $dpid 0$" "$tmp/manager.out" ||
        { _show_log "$MANAGER_LOG"; die "daemon $dpid: $(grep "^exited $dpid" "$tmp/manager.out")"; }
}
# waiting_client PID: the client is still connected, waiting for a daemon.
waiting_client()
{
    sleep 1
    kill -0 "$1" 2>/dev/null || { wait "$1" || true; die "the client did not wait for the daemon"; }
}

# A client connects before the first start, another during a restart;
# both are served once the daemon runs.
nbd_expect "$muri" "write 0 1048576 0x11 ok" "read 0 1048576 0x11 ok" \
    >"$tmp/c1.log" 2>&1 &
c1=$!
waiting_client "$c1"
start_daemon
wait "$c1" || { cat "$tmp/c1.log" >&2; die "client 1 failed after the daemon started"; }
stop_daemon
[ -S "$mnbd" ] || die "daemon removed the inherited socket"

nbd_expect "$muri" "write 1048576 1048576 0x22 ok" "read 1048576 1048576 0x22 ok" \
    >"$tmp/c2.log" 2>&1 &
c2=$!
waiting_client "$c2"
start_daemon
wait "$c2" || { cat "$tmp/c2.log" >&2; die "client 2 failed after the restart"; }
nbd_expect "$muri" "read 0 1048576 0x11 ok" "read 1048576 1048576 0x22 ok"
# Both writes are in the bitmap, kept across the clean restart (the
# megabyte of part 1 was backed up since).
st=$(ctl "$mctl" '{"execute":"status"}')
json_true '.return.bitmap."dirty-bytes" == 2097152 and .return.bitmap.trusted' "$st" ||
    die "status after the restart: $st"
stop_daemon
kill -TERM "$mgr"
wait "$mgr" || true

### 3. Sockets that do not fit are refused at start, with a message.
# refused RC TEXT MANAGER-ARGS...: the daemon exits RC, saying TEXT.
refused()
{
    local want=$1 text=$2 rc=0
    shift 2
    rm -f "$tmp"/r-*.sock
    : >"$MANAGER_LOG"
    timeout -k 5 60 "$PYTHON" -c "$manager_py" --once "$@" >"$tmp/once.out" 2>&1 || rc=$?
    if [ "$rc" -ne "$want" ] || ! grep -qF -- "$text" "$MANAGER_LOG" ||
       grep -q Sanitizer "$MANAGER_LOG"; then
        cat "$tmp/once.out" "$MANAGER_LOG" >&2
        die "manager $*: exit $rc, expected $want with '$text' and no sanitizer report"
    fi
}
d=("$CBT_FILTERD" --image "$disk" --format raw)
refused 1 "descriptor 4 is named 'bogus'; expected nbd, nbd-tcp or control" \
    nbd="$tmp/r-nbd.sock" bogus="$tmp/r-x.sock" -- "${d[@]}"
port=$(free_tcp_port)
refused 1 "the control socket must be a unix socket" \
    nbd="$tmp/r-nbd.sock" control="tcp:127.0.0.1:$port" -- "${d[@]}"
refused 2 "the NBD socket is inherited from the service manager (socket activation); leave --socket out" \
    nbd="$tmp/r-nbd.sock" -- "${d[@]}" --socket "$tmp/r-own.sock"
refused 2 "leave --control out" \
    nbd="$tmp/r-nbd.sock" control="$tmp/r-ctl.sock" -- "${d[@]}" --control "$tmp/r-own.sock"
# LISTEN_PID names another process: the sockets are not ours.
refused 2 "one of --socket or --listen is required" \
    --wrong-pid nbd="$tmp/r-nbd.sock" -- "${d[@]}"
[ ! -e "$tmp/r-own.sock" ] || die "a refused daemon left its own socket behind"
exit 0
