# Shared helpers for the end-to-end tests (tests/test-*.sh).
#
# Each test sources this file first.  It turns on `set -euo pipefail`,
# creates a private temporary directory $tmp, and installs an EXIT trap that
# runs the registered cleanup commands in reverse order (daemons are killed,
# $tmp is removed; set CBT_KEEP_TMP=1 to keep it for debugging).
#
# The daemon is $CBT_FILTERD (set by meson); when a test is run by hand from
# the repository root it falls back to $CBT_BUILD_DIR/filterd/cbt-filterd,
# then build/filterd/cbt-filterd.
#
# Exit codes follow the meson/automake convention: 0 pass, 77 skip (a tool
# is missing), anything else fail.

set -euo pipefail

testsdir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${CBT_SOURCE_DIR:=$(cd "$testsdir/.." && pwd)}"
: "${CBT_BUILD_DIR:=$CBT_SOURCE_DIR/build}"
: "${CBT_FILTERD:=$CBT_BUILD_DIR/filterd/cbt-filterd}"
# The libnbd python bindings are installed for the system interpreter only;
# the python3 first on PATH may be another one.
PYTHON=/usr/bin/python3
# tests/nbdraw.py: raw NBD client pieces for misbehaving clients.
export PYTHONPATH=$CBT_SOURCE_DIR/tests${PYTHONPATH:+:$PYTHONPATH}
progname=$(basename "$0" .sh)

# Report why the test failed and exit non-zero (the EXIT trap cleans up).
die()
{
    echo "$progname: FAIL: $*" >&2
    exit 1
}
fail() { die "$@"; }

skip()
{
    echo "$progname: SKIP: $*" >&2
    exit 77
}

# requires TOOL...: skip the test unless every TOOL is on $PATH.
requires()
{
    local t
    for t in "$@"; do
        command -v "$t" >/dev/null 2>&1 || skip "$t is not installed"
    done
}

requires_python_nbd()
{
    [ -x "$PYTHON" ] || skip "$PYTHON is not installed"
    "$PYTHON" -c 'import nbd' 2>/dev/null ||
        skip "$PYTHON has no libnbd module (python3-libnbd)"
}

# cleanup_fn CMD [ARGS...]: run CMD on exit, last registered first.
_cleanup_cmds=()
declare -A _daemon_log=()       # pid -> log file of each daemon started
cleanup_fn()
{
    local q
    printf -v q '%q ' "$@"
    _cleanup_cmds+=("$q")
}

_run_cleanup()
{
    local status=$? i l
    set +e
    # On failure show what the daemons said before their logs go away.
    if [ $status -ne 0 ] && [ $status -ne 77 ]; then
        for l in "${_daemon_log[@]}"; do
            [ -s "$l" ] && { echo "--- last lines of $l" >&2; tail -n 20 "$l" >&2; }
        done
    fi
    for (( i = ${#_cleanup_cmds[@]} - 1; i >= 0; i-- )); do
        eval "${_cleanup_cmds[i]}"
    done
    exit $status
}
trap _run_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cbt-$progname.XXXXXX")
_rm_tmp()
{
    if [ -n "${CBT_KEEP_TMP:-}" ]; then
        echo "$progname: keeping $tmp" >&2
    else
        rm -rf "$tmp"
    fi
}
cleanup_fn _rm_tmp

# Kill a daemon we started if the test ends without stopping it.
_kill_daemon()
{
    if kill -0 "$1" 2>/dev/null; then
        kill -KILL "$1" 2>/dev/null
        wait "$1" 2>/dev/null
    fi
    return 0
}

# Print a daemon log file on stderr (used when something went wrong).
_show_log()
{
    [ -s "$1" ] || return 0
    echo "--- $1" >&2
    cat "$1" >&2
    echo "---" >&2
}

_ndaemons=0

# start_filterd ARGS...
#
# Start the daemon in the foreground in the background of this shell.
# Unless ARGS contain --socket or --listen it listens on a private unix
# socket named by `mktemp -u`.  A --pid-file is added unless given, and
# we wait (bounded) for it to appear: the daemon writes it only once the
# socket accepts connections.  If the daemon dies first, its log is
# printed and the test fails.
#
# Sets: $pid, $sock (empty for --listen), $uri (nbd+unix:// or nbd://,
# with the --export-name if any), $log (its stdout+stderr), $pidfile.
start_filterd()
{
    local args=("$@") a prev= listen= name= has_sock= has_pidf= i status

    [ -x "$CBT_FILTERD" ] ||
        die "daemon $CBT_FILTERD not found (build it: ninja -C build)"

    sock= pidfile=
    for a in "${args[@]}"; do
        case "$prev" in
            --socket) has_sock=1; sock=$a ;;
            --listen) listen=$a ;;
            --export-name) name=$a ;;
            --pid-file) has_pidf=1; pidfile=$a ;;
        esac
        prev=$a
    done
    if [ -z "$has_sock" ] && [ -z "$listen" ]; then
        sock=$(mktemp -u "$tmp/sock.XXXXXX")
        args+=(--socket "$sock")
    fi
    if [ -z "$has_pidf" ]; then
        pidfile=$(mktemp -u "$tmp/pid.XXXXXX")
        args+=(--pid-file "$pidfile")
    fi
    _ndaemons=$((_ndaemons + 1))
    log=$tmp/filterd-$_ndaemons.log

    # $FILTERD_PREFIX: an optional command that execs the daemon (env ...).
    ${FILTERD_PREFIX:-} "$CBT_FILTERD" "${args[@]}" </dev/null >"$log" 2>&1 &
    pid=$!
    _daemon_log[$pid]=$log
    cleanup_fn _kill_daemon "$pid"

    # A startup guard, not a performance check: 60 s is far beyond what
    # any healthy daemon needs.
    for (( i = 0; i < 600; i++ )); do
        [ -s "$pidfile" ] && break
        if ! kill -0 "$pid" 2>/dev/null; then
            status=0
            wait "$pid" || status=$?
            _show_log "$log"
            die "cbt-filterd ${args[*]}: exited with status $status before writing $pidfile"
        fi
        sleep 0.1
    done
    if [ ! -s "$pidfile" ]; then
        _show_log "$log"
        die "cbt-filterd ${args[*]}: no pid file after 60 s"
    fi
    # Allow for a pid file that is written in two steps.
    for (( i = 0; i < 10; i++ )); do
        [ "$(cat "$pidfile")" = "$pid" ] && break
        sleep 0.1
    done
    [ "$(cat "$pidfile")" = "$pid" ] ||
        die "pid file $pidfile holds '$(cat "$pidfile")', expected $pid"
    # The pid file promises a listening socket.
    if [ -n "$sock" ] && [ ! -S "$sock" ]; then
        die "pid file $pidfile written but $sock is not a socket yet"
    fi

    if [ -n "$listen" ]; then
        uri="nbd://$listen/$name"
    else
        uri="nbd+unix:///$name?socket=$sock"
    fi
    export pid sock uri log pidfile
}

# stop_filterd [PID]: SIGTERM the daemon (default $pid) and require a
# clean exit with status 0.
stop_filterd()
{
    local p=${1:-$pid} i status=0
    local plog=${_daemon_log[$p]:-$log}
    kill -TERM "$p" || die "kill -TERM $p: daemon already gone"
    for (( i = 0; i < 600; i++ )); do
        kill -0 "$p" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$p" 2>/dev/null; then
        kill -KILL "$p"
        wait "$p" || true
        _show_log "$plog"
        die "daemon $p did not exit within 60 s of SIGTERM"
    fi
    wait "$p" || status=$?
    if [ "$status" -ne 0 ]; then
        _show_log "$plog"
        die "daemon $p exited with status $status after SIGTERM, expected 0"
    fi
}

# free_tcp_port: print a TCP port on 127.0.0.1 that nothing listens on now.
free_tcp_port()
{
    "$PYTHON" -c '
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

# qio ARGS...: run qemu-io; fail if it exits non-zero or reports a failed
# operation or pattern mismatch (older qemu-io exits 0 on those).
qio()
{
    local out status=0
    out=$(qemu-io "$@" 2>&1) || status=$?
    if [ "$status" -ne 0 ] || grep -qiE 'fail|error|mismatch' <<<"$out"; then
        echo "$out" >&2
        die "qemu-io $*: status $status"
    fi
}

# qio_fails ERRTEXT ARGS...: run qemu-io and require ERRTEXT in its output.
qio_fails()
{
    local want=$1 out
    shift
    out=$(qemu-io "$@" 2>&1) || true
    grep -qF "$want" <<<"$out" || {
        echo "$out" >&2
        die "qemu-io $*: expected '$want'"
    }
}

# make_pattern_file FILE SIZE BYTE: FILE of SIZE bytes all equal to BYTE
# (e.g. 0x11), fully allocated.
make_pattern_file()
{
    "$PYTHON" -c '
import sys
with open(sys.argv[1], "wb") as f:
    b = bytes([int(sys.argv[3], 0)]) * 65536
    n = int(sys.argv[2])
    while n > 0:
        f.write(b[:min(n, len(b))])
        n -= min(n, len(b))' "$1" "$2" "$3"
}

# flip_byte FILE OFFSET: invert one byte of FILE in place (damage for the
# checksum tests).
flip_byte()
{
    local b
    b=$(od -An -tu1 -j "$2" -N1 "$1" | tr -d ' ')
    printf "\\$(printf %03o $((b ^ 0xff)))" |
        dd of="$1" bs=1 seek="$2" count=1 conv=notrunc status=none
}

# ctl SOCKET JSON...: send each JSON request line to the daemon's control
# socket on one connection and print each reply line.
ctl()
{
    local csock=$1; shift
    "$PYTHON" - "$csock" "$@" <<'PYEOF'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(sys.argv[1])
f = s.makefile("rw")
for line in sys.argv[2:]:
    f.write(line + "\n")
    f.flush()
    print(f.readline().rstrip("\n"))
PYEOF
}

# cbt ARGS...: the CLI under test ($CBT_CLI, set by meson).
: "${CBT_CLI:=$CBT_BUILD_DIR/cbt/cbt}"
cbt() { "$CBT_CLI" "$@"; }

# expect_rc WANT CMD...: run CMD, require exit status WANT; its stdout and
# stderr end up in $out (both) for further checks.
expect_rc()
{
    local want=$1 rc=0
    shift
    out=$("$@" 2>&1) || rc=$?
    [ "$rc" -eq "$want" ] || { echo "$out" >&2; die "$*: exit $rc, expected $want"; }
}

# has TEXT: $out (from expect_rc) contains TEXT.
has()
{
    grep -qF -- "$1" <<<"$out" || { echo "$out" >&2; die "expected '$1' in the output above"; }
}

# has_in_order FIRST SECOND: $out has a line with FIRST, and the first
# line with SECOND comes after it (a cause is told before what was done
# about it).
has_in_order()
{
    local a b
    a=$(grep -nF -m1 -- "$1" <<<"$out" | cut -d: -f1)
    b=$(grep -nF -m1 -- "$2" <<<"$out" | cut -d: -f1)
    [ -n "$a" ] && [ -n "$b" ] && [ "$a" -lt "$b" ] ||
        { echo "$out" >&2; die "expected '$1' on a line before '$2' in the output above"; }
}

# dirty_map [CONTEXT]: the running daemon's dirty bitmap (default
# qemu:dirty-bitmap:cbt) as nbdinfo sees it, "offset length" lines of
# merged dirty runs.
dirty_map()
{
    nbdinfo --map="${1:-qemu:dirty-bitmap:cbt}" --json "$uri" | jq -r '
        reduce .[] as $e ([];
            if length > 0 and .[-1].type == $e.type
            then .[-1].length += $e.length else . + [$e] end)
        | .[] | select(.type == 1) | "\(.offset) \(.length)"'
}

# stop_at_checkpoint CSOCK PID: wait (bounded, 60 s) until the daemon on
# control socket CSOCK reports a checkpoint in progress, then SIGSTOP PID
# (a running "$CBT_CLI" backup, not the cbt() function: its subshell) at once, so a test can change the disk while the
# backup holds its point-in-time view.  Fails if PID exits first.
stop_at_checkpoint()
{
    # A test that dies while the backup is stopped must not leave it behind.
    cleanup_fn _kill_quietly "$2"
    "$PYTHON" - "$1" "$2" "${3:-}" <<'PYEOF' || die "no checkpoint began while backup $2 ran"
import json, os, signal, socket, sys, time
path, pid, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(path)
f = s.makefile("rw")
if go:
    # The backup waits for this before it starts: the poller is running
    # already when its checkpoint begins, however slow python starts.
    with open(go, "w") as g:
        g.write("go\n")
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    f.write('{"execute":"status"}\n')
    f.flush()
    st = json.loads(f.readline())["return"]
    if st.get("checkpoint"):
        os.kill(pid, signal.SIGSTOP)
        sys.exit(0)
    try:
        with open("/proc/%d/stat" % pid) as p:
            if p.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                sys.exit(1)
    except FileNotFoundError:
        sys.exit(1)
    time.sleep(0.002)
sys.exit(1)
PYEOF
}

_kill_quietly() { kill -KILL "$1" 2>/dev/null || true; }

# view_status CSOCK: the point-in-time view's status object (JSON), or null.
view_status()
{
    ctl "$1" '{"execute":"status"}' | jq -c '.return.checkpoint."point-in-time"'
}

# overwrite_all URI SIZE BYTE: rewrite the whole disk with BYTE from its end
# backwards in 4 MiB writes (a guest that changes every granule), through
# one qemu-io; every write must succeed.
overwrite_all()
{
    local uri=$1 size=$2 byte=$3 off args=()
    for (( off = size - 4194304; off >= 0; off -= 4194304 )); do
        args+=(-c "write -P $byte $off 4M")
    done
    qio -f raw "$uri" "${args[@]}"
}

# scratch_files_of PID: the unlinked scratch files daemon PID holds open.
scratch_files_of()
{
    ls -l "/proc/$1/fd" 2>/dev/null | grep -c -e '(deleted)' || true
}

# json_true FILTER TEXT: TEXT is JSON and FILTER is true of it.  (jq 1.6's
# -e exits 0 on empty input, so a missing reply would pass a bare jq -e.)
json_true()
{
    [ -n "$2" ] && jq -e "$1" <<<"$2" >/dev/null
}

# jq: as jq, except that with -e empty standard input fails (jq 1.6 exits
# 0 there, so a test checking a reply that never came would pass).  Input
# from a file named last is left to jq.
jq()
{
    local a in
    [ -f "${*: -1}" ] && { command jq "$@"; return; }
    for a in "$@"; do
        if [ "$a" = -e ]; then
            in=$(cat)
            [ -n "$in" ] || { echo "jq -e: empty input" >&2; return 4; }
            command jq "$@" <<<"$in"
            return
        fi
    done
    command jq "$@"
}

# requires_fault_injection: skip unless the daemon and the CLI were built
# with meson -Dfault_injection=true (they then know CBT_FI_FAIL, see
# lib/fault-inject.c); without it they ignore the variable.
requires_fault_injection()
{
    local b
    for b in "$CBT_FILTERD" "$CBT_CLI"; do
        [ -x "$b" ] || die "$b not found (build it: ninja -C build)"
        grep -qa CBT_FI_FAIL "$b" ||
            skip "$b was built without -Dfault_injection=true"
    done
}

# start_filterd_fi RULES ARGS...: start_filterd ARGS with
# CBT_FI_FAIL=RULES (lib/fault-inject.c) in the daemon's environment.
start_filterd_fi()
{
    local rules=$1
    shift
    FILTERD_PREFIX="env CBT_FI_FAIL=$rules" start_filterd "$@"
}

# injected FILE FAULT: FILE (a daemon log, a saved output) says that FAULT
# ("image write 2: EIO") was injected, so the test did what it meant to.
injected()
{
    grep -qF "cbt fault injection: $2" "$1" || {
        _show_log "$1"
        die "fault '$2' was not injected (see $1 above)"
    }
}

# nbd_expect URI STEP...: run STEPs in order on one libnbd connection and
# require each to have its expected outcome.  A STEP is "OP OFFSET LENGTH
# BYTE WANT": OP write (BYTE repeated), read (must return BYTE repeated),
# zero, trim or flush (OFFSET LENGTH BYTE ignored), each optionally with
# "+fua"; WANT ok or the errno name libnbd reports (EIO, ENOSPC, ...).
# NBD_EXPECT_NO_SR=1 refuses structured replies (simple error replies).
nbd_expect()
{
    "$PYTHON" - "$@" <<'PYEOF'
import os, sys
import nbd
h = nbd.NBD()
if os.environ.get("NBD_EXPECT_NO_SR") == "1":
    h.set_request_structured_replies(False)
h.connect_uri(sys.argv[1])
for step in sys.argv[2:]:
    op, off, ln, byte, want = step.split()
    off, ln, byte = int(off, 0), int(ln, 0), int(byte, 0)
    flags = 0
    if op.endswith("+fua"):
        op, flags = op[:-4], nbd.CMD_FLAG_FUA
    got = "ok"
    try:
        if op == "write":
            h.pwrite(bytes([byte]) * ln, off, flags)
        elif op == "read":
            data = h.pread(ln, off)
            if data != bytes([byte]) * ln:
                bad = next(i for i in range(ln) if data[i] != byte)
                got = "wrong data at %d (0x%02x)" % (off + bad, data[bad])
        elif op == "zero":
            h.zero(ln, off, flags)
        elif op == "trim":
            h.trim(ln, off, flags)
        elif op == "flush":
            h.flush()
        else:
            sys.exit("nbd_expect: unknown step " + step)
    except nbd.Error as e:
        got = str(e.errno) if e.errno else "error (%s)" % e
    if got != want:
        sys.exit("nbd_expect: %s: got %s, expected %s" % (step, got, want))
h.shutdown()
PYEOF
}

# backup_frozen_at_checkpoint CSOCK OUT CMD...: run CMD (a cbt backup) in
# the background with its output in OUT, and return once it is stopped
# (SIGSTOP) right after its checkpoint began; its pid is in $bp.  The
# poller is started first and CMD only once it polls, so a slow start of
# the poller (a loaded machine) cannot let the backup read ahead.
backup_frozen_at_checkpoint()
{
    local csock=$1 out=$2 go
    shift 2
    go=$(mktemp -u "$tmp/go.XXXXXX")
    mkfifo "$go"
    ( read -r _ <"$go"; exec "$@" ) >"$out" 2>&1 &
    bp=$!
    stop_at_checkpoint "$csock" "$bp" "$go"
    rm -f "$go"
}

# wait_for_word FILE WORD [PID]: wait (at most 60 s, a hang guard) until
# FILE holds WORD, e.g. a helper process saying "ready"; dies if PID
# exits first or the time is up, showing FILE.
wait_for_word()
{
    local file=$1 word=$2 p=${3:-} i
    for (( i = 0; i < 600; i++ )); do
        grep -q -- "$word" "$file" 2>/dev/null && return 0
        if [ -n "$p" ] && ! kill -0 "$p" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    cat "$file" >&2 2>/dev/null
    die "no '$word' in $file"
}
