#!/usr/bin/env bash
# What a running backup costs the guest: fio 4k random writes at QD32
# (--ioengine=nbd, one connection) against cbt-filterd
#
#   cbt-idle     with --bitmap, --control and --scratch, no backup running
#   cbt-backup   while `cbt backup --full` pulls the point-in-time view
#                (NAME@checkpoint) into a fresh repository, so every guest
#                write to a granule the backup has not read yet first
#                copies the granule's old data into the scratch file
#   cbt-nbdcopy  while the same view is read by `nbdcopy --flush` into a
#                raw file (checkpoint-begin {"point-in-time": "full"}, copy
#                NAME@checkpoint, checkpoint-abort): the client QEMU gets
#                below, so the two copy-before-write implementations are
#                compared with the same reader.  nbdcopy sends no TRIM, so
#                nothing is released before the view ends (as with QEMU)
#                and the daemon runs with --scratch-limit = the image size
#                unless SCRATCH_LIMIT is given
#
# and, when qemu-storage-daemon is installed (QEMU=0 skips it), the same
# against QEMU's own copy-before-write with image fleecing:
#
#   qemu-idle    qemu-storage-daemon exporting the raw image over NBD
#   qemu-backup  while a blockdev-backup sync=none job (QEMU's
#                copy-before-write filter, inserted above the image) saves
#                old data into a qcow2 fleecing overlay (backing: the
#                image) that is exported read-only and read by nbdcopy
#
# One image, written once from /dev/urandom (fully allocated), serves every
# run: two identically made files were seen to differ by 20-40%, so
# variants are compared on the same file only.  Each run starts its daemon
# fresh (a fresh bitmap for cbt); in every round the variants take turns,
# the first one rotating from round to round.  The median of ROUNDS runs is
# reported, and the ratio backup/idle.
#
# A backup run: fio starts (time based, RUNTIME seconds, no ramp) and the
# backup is started right after fio has connected to the server.  When a
# backup finishes while fio still runs, another full backup into another
# fresh repository (for QEMU: a fresh fleecing overlay, a new job and
# nbdcopy) starts at once, so backups cover the whole fio window; the last
# one is waited for after fio ends.
# Repositories are deleted after the run.  While the backups run the
# daemon's control status is polled every 100 ms and the largest
# checkpoint."point-in-time"."scratch-peak" seen is kept; it is checked
# against the daemon's "scratch peak N bytes" log lines and the backups'
# own --json summaries.  For QEMU the scratch figure is the space allocated
# to the fleecing overlay when its job is cancelled (QEMU never releases
# what the backup has read, so that is its peak).
#
# The image's page cache state matters a lot here: 4k writes into a page
# cache of large folios (what a sequential read or write leaves, e.g. dd)
# cost the kernel far more (ext4_block_write_begin walks every block of
# the folio) than writes into a file that is not cached; on the project's
# machine idle IOPS differed about 5x between the two states.  So before
# every run the image is synced, dropped from the page cache
# (POSIX_FADV_DONTNEED) and read once sequentially (IMAGE_CACHE=reread),
# which gives every run the same, large-folio state.
#
# Backup durations: cbt's is the wall time of `cbt backup` (checkpoint,
# copy into a qcow2 file, SHA-256, fsync, rename, manifest, commit);
# cbt-nbdcopy's that of checkpoint-begin, nbdcopy and checkpoint-abort;
# QEMU's is the wall time of setup (qemu-img create, blockdev-add,
# blockdev-backup, block-export-add), `nbdcopy --flush` into a raw file,
# and teardown.  The table shows the median duration of each run's first
# backup (the one that starts with fio) and the number of backups per run.
#
# Builds nothing: build first (ninja -C build).  The two binaries are
# copied into the private directory at the start, so a rebuild while the
# benchmark runs cannot mix versions.
#
# Environment (defaults in brackets):
#   ROUNDS [3]         runs per variant; medians are reported
#   RUNTIME [15]       seconds per fio run
#   SIZE_MIB [2048]    image size
#   SCRATCH_LIMIT      cbt-filterd --scratch-limit [the daemon's default]
#   SCRATCH_DIR        cbt-filterd --scratch, and where QEMU's fleecing
#                      overlays go [a directory in the private temp dir]
#   REPO_DIR           where the repositories (cbt) and nbdcopy's output
#                      files (QEMU) go [the private temp dir]
#   QEMU [auto]        0: no QEMU variants; 1: require them
#   VARIANTS           e.g. "cbt-idle cbt-backup" [all five]
#   CBT_FILTERD, CBT_CLI   binaries [build/filterd/cbt-filterd, build/cbt/cbt]
#   OUT                JSON result file [${TMPDIR:-/tmp}/cbt-pit-backup-DATE.json]
#   IMAGE_CACHE [reread]  the image's page cache before each run: reread
#                      (drop, then read sequentially), evict (drop only),
#                      asis (leave it)
#   TMPDIR             where the private directory with the image goes

set -euo pipefail

cd "$(dirname "$0")/.."
src=$PWD

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-15}
SIZE_MIB=${SIZE_MIB:-2048}
QEMU=${QEMU:-auto}
export IMAGE_CACHE=${IMAGE_CACHE:-reread}
filterd=${CBT_FILTERD:-$src/build/filterd/cbt-filterd}
cli=${CBT_CLI:-$src/build/cbt/cbt}
stamp=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-${TMPDIR:-/tmp}/cbt-pit-backup-$stamp.json}
PY=/usr/bin/python3
size_bytes=$((SIZE_MIB * 1024 * 1024))

die() { echo "pit-backup: $*" >&2; exit 1; }
say() { echo "pit-backup: $*"; }

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS=$ROUNDS: not a positive number"
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RUNTIME=$RUNTIME: not a positive number"
[[ $SIZE_MIB =~ ^[1-9][0-9]*$ ]] || die "SIZE_MIB=$SIZE_MIB: not a positive number"
[[ $IMAGE_CACHE =~ ^(reread|evict|asis)$ ]] || die "IMAGE_CACHE=$IMAGE_CACHE: expected reread, evict or asis"
for tool in fio "$PY" ss pgrep awk; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"
[[ -x $filterd ]] || die "$filterd not built (ninja -C build)"
[[ -x $cli ]] || die "$cli not built (ninja -C build)"

have_qemu=1
for tool in qemu-storage-daemon qemu-img nbdcopy; do
    command -v "$tool" >/dev/null || have_qemu=0
done
case $QEMU in
0) have_qemu=0 ;;
1) ((have_qemu)) || die "QEMU=1 but qemu-storage-daemon, qemu-img or nbdcopy is missing" ;;
auto) ((have_qemu)) || say "qemu-storage-daemon/nbdcopy not found: QEMU variants skipped" ;;
*) die "QEMU=$QEMU: expected 0, 1 or auto" ;;
esac
default_variants="cbt-idle cbt-backup"
command -v nbdcopy >/dev/null && default_variants+=" cbt-nbdcopy"
((have_qemu)) && default_variants+=" qemu-idle qemu-backup"
read -r -a variants <<<"${VARIANTS:-$default_variants}"
for v in "${variants[@]}"; do
    case $v in
    cbt-idle|cbt-backup) ;;
    cbt-nbdcopy) command -v nbdcopy >/dev/null || die "variant $v needs nbdcopy" ;;
    qemu-idle|qemu-backup) ((have_qemu)) || die "variant $v needs qemu-storage-daemon and nbdcopy" ;;
    *) die "unknown variant '$v'" ;;
    esac
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cbt-pit-bench.XXXXXX")
chmod 700 "$tmp"
img=$tmp/disk.img
resdir=$tmp/results
mkdir "$resdir"
# Private subdirectories, also when SCRATCH_DIR / REPO_DIR are given, so
# cleanup removes only what this script made.
scratch=
repos=

# Every background process this script starts is recorded here (pid ->
# what), and killed on exit if it is still running.
declare -A bg=()
daemon_pid=
stop_pid() {
    local p=$1
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$p" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
    unset "bg[$p]"
}
cleanup() {
    local p
    # Clients (fio, backups, the poller) first, then the daemon.
    for p in "${!bg[@]}"; do
        [[ ${bg[$p]} == *daemon* || ${bg[$p]} == cbt-filterd ]] || stop_pid "$p"
    done
    for p in "${!bg[@]}"; do
        stop_pid "$p"
    done
    rm -rf "$scratch" "$repos" "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
scratch=$(mktemp -d "${SCRATCH_DIR:-$tmp}/pit-scratch.XXXXXX")
repos=$(mktemp -d "${REPO_DIR:-$tmp}/pit-repos.XXXXXX")
mkdir "$tmp/bin"
cp "$filterd" "$tmp/bin/cbt-filterd"
cp "$cli" "$tmp/bin/cbt"
meta_bin=$(sha256sum "$tmp/bin/cbt-filterd" "$tmp/bin/cbt" | awk '{printf "%s ", substr($1, 1, 12)}')
meta_rev=$(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$src" diff --quiet HEAD -- filterd tools lib 2>/dev/null || meta_rev+="+dirty"
filterd=$tmp/bin/cbt-filterd
cli=$tmp/bin/cbt

# Helpers in python (the libnbd-free parts: JSON over unix sockets).
#
# poll.py CTL OUT: one control connection, `status` every 100 ms; one line
# "t scratch-bytes scratch-peak copied-bytes checkpoint" per sample with a
# view, until the daemon goes away or we are terminated.
cat >"$tmp/poll.py" <<'EOF'
import json, signal, socket, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
out = open(sys.argv[2], "w", buffering=1)
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
f = s.makefile("rw")
t0 = time.monotonic()
try:
    while True:
        f.write('{"execute":"status"}\n')
        f.flush()
        line = f.readline()
        if not line:
            break
        cp = (json.loads(line).get("return") or {}).get("checkpoint") or {}
        v = cp.get("point-in-time")
        if v:
            out.write("%.2f %d %d %d %s\n" % (time.monotonic() - t0, v["scratch-bytes"],
                      v["scratch-peak"], v["copied-bytes"], cp.get("checkpoint")))
        time.sleep(0.1)
except (OSError, ValueError):
    pass
EOF
# ctl.py SOCK JSON...: control requests on one connection; fail on an
# error reply.
cat >"$tmp/ctl.py" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(sys.argv[1])
f = s.makefile("rw")
for a in sys.argv[2:]:
    f.write(a + "\n")
    f.flush()
    r = json.loads(f.readline())
    if "error" in r:
        sys.exit("control %s: %s" % (a, r["error"].get("desc")))
EOF
# evict.py FILE: write FILE's dirty pages and drop it from the page cache.
cat >"$tmp/evict.py" <<'EOF'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.fsync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)
EOF
# qmp.py SOCK JSON...: run QMP commands, fail on an error reply.  A command
# {"wait-job-gone": ID} waits (at most 30 s) until block job ID is gone.
cat >"$tmp/qmp.py" <<'EOF'
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(sys.argv[1])
f = s.makefile("rw")
def call(cmd):
    f.write(json.dumps(cmd) + "\n")
    f.flush()
    while True:
        m = json.loads(f.readline())
        if "event" in m:
            continue
        if "error" in m:
            sys.exit("qmp %s: %s" % (json.dumps(cmd), m["error"].get("desc")))
        return m["return"]
f.readline()
call({"execute": "qmp_capabilities"})
for a in sys.argv[2:]:
    cmd = json.loads(a)
    if "wait-job-gone" in cmd:
        end = time.monotonic() + 30
        while any(j["device"] == cmd["wait-job-gone"]
                  for j in call({"execute": "query-block-jobs"})):
            if time.monotonic() > end:
                sys.exit("qmp: job %s still there after 30 s" % cmd["wait-job-gone"])
            time.sleep(0.02)
    else:
        call(cmd)
EOF

# fg_wait PID WHAT: wait for a command started with &, so that a signal
# to this script is acted on at once (and cleanup stops the command).
fg_wait() {
    local rc=0
    bg[$1]=$2
    wait "$1" || rc=$?
    unset "bg[$1]"
    return "$rc"
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

# wait_listen PID SOCK LOG NAME: wait until SOCK is a socket.
wait_listen() {
    local p=$1 s=$2 log=$3 name=$4
    for _ in $(seq 200); do
        [[ -S $s ]] && return 0
        kill -0 "$p" 2>/dev/null || { cat "$log" >&2; die "$name exited before it listened"; }
        sleep 0.05
    done
    cat "$log" >&2
    die "$name did not listen on $s within 10 s"
}

# start_cbt RUNDIR VARIANT: a fresh cbt-filterd (fresh bitmap) on
# RUNDIR/nbd.sock.
start_cbt() {
    local d=$1 extra=()
    if [[ -n ${SCRATCH_LIMIT:-} ]]; then
        extra+=(--scratch-limit "$SCRATCH_LIMIT")
    elif [[ $2 == cbt-nbdcopy ]]; then
        extra+=(--scratch-limit "$size_bytes")
    fi
    "$filterd" --image "$img" --format raw --socket "$d/nbd.sock" \
        --control "$d/ctl.sock" --bitmap "$d/bitmap" --scratch "$scratch" \
        --pid-file "$d/daemon.pid" "${extra[@]}" </dev/null >"$d/daemon.log" 2>&1 &
    daemon_pid=$!
    bg[$daemon_pid]=cbt-filterd
    for _ in $(seq 200); do
        [[ -s $d/daemon.pid && -S $d/ctl.sock ]] && break
        kill -0 "$daemon_pid" 2>/dev/null || { cat "$d/daemon.log" >&2; die "cbt-filterd exited at start"; }
        sleep 0.05
    done
    wait_listen "$daemon_pid" "$d/nbd.sock" "$d/daemon.log" cbt-filterd
}

# start_qsd RUNDIR: qemu-storage-daemon exporting the image as "" on
# RUNDIR/nbd.sock, QMP on RUNDIR/qmp.sock.
start_qsd() {
    local d=$1
    qemu-storage-daemon \
        --chardev "socket,id=mon0,path=$d/qmp.sock,server=on,wait=off" \
        --monitor chardev=mon0 \
        --blockdev "driver=file,node-name=src,filename=$img,aio=io_uring,cache.direct=off" \
        --nbd-server "addr.type=unix,addr.path=$d/nbd.sock" \
        --export "type=nbd,id=guest,node-name=src,name=,writable=on" \
        </dev/null >"$d/daemon.log" 2>&1 &
    daemon_pid=$!
    bg[$daemon_pid]=qemu-storage-daemon
    wait_listen "$daemon_pid" "$d/qmp.sock" "$d/daemon.log" qemu-storage-daemon
    wait_listen "$daemon_pid" "$d/nbd.sock" "$d/daemon.log" qemu-storage-daemon
}

# wait_fio_connected PID: wait (at most 10 s) until fio's job process (a
# child of PID) holds a connected unix socket, i.e. it has connected to the
# NBD server and its I/O starts, so a backup started now overlaps it.
wait_fio_connected() {
    local p=$1 c
    for _ in $(seq 500); do
        for c in $(pgrep -P "$p" || true); do
            ss -xpH state connected 2>/dev/null | grep -q "pid=$c," && return 0
        done
        kill -0 "$p" 2>/dev/null || return 0
        sleep 0.02
    done
    say "fio did not connect within 10 s; starting the backup anyway"
}

stop_daemon() {
    [[ -n $daemon_pid ]] && stop_pid "$daemon_pid"
    daemon_pid=
}

# One QEMU fleecing backup, n-th of the run: overlay, job, export, nbdcopy,
# teardown.  Appends "n seconds overlay-bytes rc" to RUNDIR/backups.
qemu_backup() {
    local d=$1 n=$2 t0 t1 rc=0 ov repo alloc
    ov=$scratch/fleece.$n.qcow2
    repo=$repos/${d##*/}.$n
    t0=$(now)
    mkdir "$repo"
    qemu-img create -q -f qcow2 -o cluster_size=65536 -F raw -b "$img" "$ov" "$size_bytes"
    "$PY" "$tmp/qmp.py" "$d/qmp.sock" \
        '{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"fleece'"$n"'","file":{"driver":"file","filename":"'"$ov"'"},"backing":"src"}}' \
        '{"execute":"blockdev-backup","arguments":{"job-id":"fl'"$n"'","device":"src","target":"fleece'"$n"'","sync":"none"}}' \
        '{"execute":"block-export-add","arguments":{"type":"nbd","id":"fl'"$n"'","node-name":"fleece'"$n"'","name":"fleece","writable":false}}'
    nbdcopy --flush "nbd+unix:///fleece?socket=$d/nbd.sock" "$repo/backup.raw" \
        >>"$d/backup.log" 2>&1 &
    fg_wait $! nbdcopy || rc=$?
    alloc=$(( $(stat -c %b "$ov") * $(stat -c %B "$ov") ))
    "$PY" "$tmp/qmp.py" "$d/qmp.sock" \
        '{"execute":"block-export-del","arguments":{"id":"fl'"$n"'","mode":"hard"}}' \
        '{"execute":"block-job-cancel","arguments":{"device":"fl'"$n"'","force":true}}' \
        '{"wait-job-gone":"fl'"$n"'"}' \
        '{"execute":"blockdev-del","arguments":{"node-name":"fleece'"$n"'"}}'
    t1=$(now)
    echo "$n $(elapsed "$t0" "$t1") $alloc $rc" >>"$d/backups"
    rm -f "$ov"
}

# One cbt backup, n-th of the run, into a fresh repository.
cbt_backup() {
    local d=$1 n=$2 t0 t1 rc=0
    t0=$(now)
    "$cli" backup --socket "$d/nbd.sock" --control "$d/ctl.sock" --repo "$repos/${d##*/}.$n" \
        --full --json >"$d/backup.$n.json" 2>>"$d/backup.log" &
    fg_wait $! "cbt backup" || rc=$?
    t1=$(now)
    echo "$n $(elapsed "$t0" "$t1") 0 $rc" >>"$d/backups"
}

# One nbdcopy of cbt's point-in-time view, n-th of the run.
cbt_nbdcopy() {
    local d=$1 n=$2 t0 t1 rc=0 repo
    repo=$repos/${d##*/}.$n
    t0=$(now)
    mkdir "$repo"
    "$PY" "$tmp/ctl.py" "$d/ctl.sock" \
        '{"execute":"checkpoint-begin","arguments":{"point-in-time":"full"}}'
    nbdcopy --flush "nbd+unix:///@checkpoint?socket=$d/nbd.sock" "$repo/backup.raw" \
        >>"$d/backup.log" 2>&1 &
    fg_wait $! nbdcopy || rc=$?
    "$PY" "$tmp/ctl.py" "$d/ctl.sock" '{"execute":"checkpoint-abort"}'
    t1=$(now)
    echo "$n $(elapsed "$t0" "$t1") 0 $rc" >>"$d/backups"
}

# run VARIANT ROUND: one fio run; results in $resdir/VARIANT.ROUND/.
run() {
    local v=$1 r=$2 d=$resdir/$1.$2 fio_pid poll_pid='' n=0 sys=${1%%-*}
    mkdir "$d"
    : >"$d/backups"
    case $IMAGE_CACHE in
    reread) "$PY" "$tmp/evict.py" "$img"; dd if="$img" of=/dev/null bs=1M status=none ;;
    evict) "$PY" "$tmp/evict.py" "$img" ;;
    esac
    cut -d' ' -f1 /proc/loadavg >"$d/load"
    if [[ $sys == cbt ]]; then start_cbt "$d" "$v"; else start_qsd "$d"; fi
    fio --name="$v" --ioengine=nbd --uri="nbd+unix:///?socket=$d/nbd.sock" \
        --rw=randwrite --bs=4k --iodepth=32 --numjobs=1 --size="$size_bytes" \
        --norandommap --randrepeat=0 --runtime="$RUNTIME" --time_based \
        --write_iops_log="$d/fio" --log_avg_msec=1000 \
        --output-format=json --output="$d/fio.json" >"$d/fio.err" 2>&1 &
    fio_pid=$!
    bg[$fio_pid]=fio
    if [[ $v != *-idle ]]; then
        wait_fio_connected "$fio_pid"
        if [[ $sys == cbt ]]; then
            "$PY" "$tmp/poll.py" "$d/ctl.sock" "$d/poll" &
            poll_pid=$!
            bg[$poll_pid]=poll
        fi
        while kill -0 "$fio_pid" 2>/dev/null; do
            n=$((n + 1))
            case $v in
            cbt-backup) cbt_backup "$d" "$n" ;;
            cbt-nbdcopy) cbt_nbdcopy "$d" "$n" ;;
            qemu-backup) qemu_backup "$d" "$n" ;;
            esac
        done
    fi
    local rc=0
    wait "$fio_pid" || rc=$?
    unset "bg[$fio_pid]"
    ((rc == 0)) || { cat "$d/fio.err" >&2; die "fio failed in $v round $r"; }
    [[ -n $poll_pid ]] && stop_pid "$poll_pid"
    stop_daemon
    rm -rf "${repos:?}"/*
}

say "variants: ${variants[*]}"
say "$ROUNDS round(s) of ${RUNTIME}s fio runs (4k randwrite QD32), image in $tmp"
say "image page cache before each run: $IMAGE_CACHE"
say "writing the $SIZE_MIB MiB image from /dev/urandom (not sparse)"
dd if=/dev/urandom of="$img" bs=1M count="$SIZE_MIB" iflag=fullblock conv=fsync status=none

nvar=${#variants[@]}
total=$((ROUNDS * nvar))
k=0
for ((r = 0; r < ROUNDS; r++)); do
    for ((i = 0; i < nvar; i++)); do
        v=${variants[$(( (i + r) % nvar ))]}
        k=$((k + 1))
        printf 'pit-backup: [%2d/%d] round %d %-12s ' "$k" "$total" "$((r + 1))" "$v"
        run "$v" "$r"
        "$PY" - "$resdir/$v.$r" <<'EOF'
import json, sys
d = sys.argv[1]
w = json.load(open(d + "/fio.json"))["jobs"][0]["write"]
b = [l.split() for l in open(d + "/backups")]
s = "%8.0f IOPS" % w["iops"]
if b:
    s += "  %d backup(s): %s s" % (len(b), " ".join("%.1f" % float(x[1]) for x in b))
    bad = [x for x in b if x[3] != "0"]
    if bad:
        s += "  FAILED: %d" % len(bad)
print(s)
EOF
    done
done

meta_fio=$(fio --version)
meta_qemu=$( ((have_qemu)) && qemu-storage-daemon --version | head -n1 || echo none)

"$PY" - "$resdir" "$OUT" "$ROUNDS" "$RUNTIME" "$size_bytes" "$meta_fio" "$meta_qemu" \
    "$meta_rev" "${variants[*]}" "$meta_bin" <<'EOF'
import glob, json, os, platform, re, statistics, sys, time

resdir, out, rounds, runtime, size, v_fio, v_qemu, rev, variants, bins = sys.argv[1:]
variants = variants.split()
rounds, runtime, size = int(rounds), int(runtime), int(size)
med = lambda xs: statistics.median(xs) if xs else None

def one(d):
    w = json.load(open(d + "/fio.json"))["jobs"][0]["write"]
    # fio logs one average per second in which writes completed: a second
    # without any completion has no entry, and counts as 0 here.
    per_s = [0] * runtime
    for l in open(glob.glob(d + "/fio_iops*.log")[0]):
        if l.strip():
            t, v = (int(x) for x in l.split(",")[:2])
            if 1 <= round(t / 1000) <= runtime:
                per_s[round(t / 1000) - 1] = v
    per_s = per_s[:-1]          # the last second is often cut short
    r = {"iops": w["iops"], "lat_mean_us": w["lat_ns"]["mean"] / 1e3,
         "iops_per_second": per_s, "worst_second_iops": min(per_s),
         "stall_seconds": sum(v < 1000 for v in per_s),
         "load_before": float(open(d + "/load").read())}
    b = [l.split() for l in open(d + "/backups")]
    if b:
        r["backups"] = [{"seconds": float(x[1]), "rc": int(x[3])} for x in b]
        r["backups_failed"] = sum(x["rc"] != 0 for x in r["backups"])
        peaks = {}
        if os.path.exists(d + "/poll"):         # cbt: status samples
            samples = [l.split() for l in open(d + "/poll")]
            r["status_samples"] = len(samples)
            r["scratch_peak_polled"] = max((int(s[2]) for s in samples), default=0)
            r["scratch_bytes_max_polled"] = max((int(s[1]) for s in samples), default=0)
            logged = [int(m) for m in re.findall(r"scratch peak (\d+) bytes",
                                                 open(d + "/daemon.log").read())]
            r["scratch_peak_logged"] = max(logged, default=0)
            r["views_logged"] = len(logged)
            js = []
            for p in sorted(glob.glob(d + "/backup.*.json")):
                try:
                    js.append(json.load(open(p)))
                except ValueError:
                    pass
            r["scratch_peak_cli"] = max((j.get("scratch-peak-bytes", 0) for j in js), default=0)
            r["saved_bytes_cli"] = [j.get("saved-before-overwrite-bytes", 0) for j in js]
            r["scratch_peak"] = max(r["scratch_peak_polled"], r["scratch_peak_logged"])
        else:                                   # qemu: overlay allocation
            r["overlay_bytes"] = [int(x[2]) for x in b]
            r["scratch_peak"] = max(r["overlay_bytes"])
    return r

results = {}
for v in variants:
    runs = [one(d) for d in sorted(glob.glob(f"{resdir}/{v}.*"))]
    m = {"iops": med([x["iops"] for x in runs]),
         "lat_mean_us": med([x["lat_mean_us"] for x in runs]),
         "worst_second_iops": med([x["worst_second_iops"] for x in runs]),
         "stall_seconds": med([x["stall_seconds"] for x in runs])}
    if not v.endswith("-idle"):
        m["first_backup_s"] = med([x["backups"][0]["seconds"] for x in runs])
        m["backups_per_run"] = med([len(x["backups"]) for x in runs])
        m["backups_failed"] = sum(x["backups_failed"] for x in runs)
        m["scratch_peak_max"] = max(x["scratch_peak"] for x in runs)
        m["scratch_peak_median"] = med([x["scratch_peak"] for x in runs])
    results[v] = {"median": m, "runs": runs}

ratios = {}
for s in ("cbt", "qemu"):
    if f"{s}-idle" in results and f"{s}-backup" in results:
        ratios[f"{s}-backup/{s}-idle"] = (results[f"{s}-backup"]["median"]["iops"] /
                                          results[f"{s}-idle"]["median"]["iops"])
if "cbt-nbdcopy" in results and "cbt-idle" in results:
    ratios["cbt-nbdcopy/cbt-idle"] = (results["cbt-nbdcopy"]["median"]["iops"] /
                                      results["cbt-idle"]["median"]["iops"])
for a in ("cbt-backup", "cbt-nbdcopy"):
    if a in results and "qemu-backup" in results:
        ratios[f"{a}/qemu-backup"] = (results[a]["median"]["iops"] /
                                      results["qemu-backup"]["median"]["iops"])

mib = lambda b: "%.1f MiB" % (b / 1048576) if b is not None else "-"
print()
print(f"fio 4k randwrite QD32, one NBD connection, {runtime} s per run; "
      f"median of {rounds} run(s); image {size >> 20} MiB; cbt {rev}")
print(f"{'variant':<12} {'IOPS':>8} {'lat us':>8} {'worst 1s':>9} {'stalls':>6} "
      f"{'backup s':>9} {'backups':>8} {'scratch peak':>13} {'(max)':>11}")
for v in variants:
    m = results[v]["median"]
    line = (f"{v:<12} {m['iops']:>8.0f} {m['lat_mean_us']:>8.0f} "
            f"{m['worst_second_iops']:>9.0f} {m['stall_seconds']:>6g}")
    if not v.endswith("-idle"):
        line += (f" {m['first_backup_s']:>9.1f} {m['backups_per_run']:>8g}"
                 f" {mib(m['scratch_peak_median']):>13} {mib(m['scratch_peak_max']):>11}")
        if m["backups_failed"]:
            line += f"  {m['backups_failed']} backup(s) FAILED"
    print(line)
print()
for k, x in ratios.items():
    print(f"IOPS ratio {k:<24} {x:.2f}")
print("(worst 1s: each run's lowest IOPS in one second; stalls: seconds under "
      "1000 IOPS;\n backup s: duration of each run's first backup; all medians)")
loads = [x["load_before"] for v in variants for x in results[v]["runs"]]
print(f"load average (1 min) before the runs: {min(loads):.1f} to {max(loads):.1f} "
      f"on {os.cpu_count()} CPUs")
if max(loads) > os.cpu_count():
    print("pit-backup: WARNING: something else was running; figures are noisy")

doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cbt_rev": rev,
       "binaries_sha256": bins.split(),
       "kernel": platform.release(), "cpus": os.cpu_count(), "fio": v_fio,
       "qemu": v_qemu, "image_cache": os.environ.get("IMAGE_CACHE", "reread"),
       "rounds": rounds, "runtime_s": runtime, "image_bytes": size,
       "variants": variants, "results": results, "iops_ratios": ratios}
with open(out, "w") as f:
    json.dump(doc, f, indent=2)
print(f"\npit-backup: results written to {out}")
EOF
