#!/usr/bin/env bash
# A walk through cbt on a throw-away disk image, step by step:
#
#   install packages, build, make a 256 MiB sparse raw image, serve it with
#   cbt-filterd (dirty bitmap and control socket on) on a private unix
#   socket, write patterns through NBD with qemu-io, read them back, take a
#   full backup, change some blocks (write, zero, discard), take an
#   incremental backup of just those while a writer rewrites them (the
#   backup keeps the point in time), verify the repository, restore both
#   points and compare them byte for byte with copies of the image taken
#   at those points, stop the daemon with SIGTERM, and check the bytes in
#   the image file and the bitmap it left (clean).
#
# Prints what each step does and "demo: OK" at the end; exits non-zero with
# the reason on the first failure.  Everything lives in one temp directory
# under ${TMPDIR:-/tmp}, removed on exit (keep it with CBT_DEMO_KEEP=1).
#
# Environment:
#   CBT_FILTERD=PATH  use this daemon instead of building build/filterd/
#   CBT_DEMO_KEEP=1   keep the temp directory (image, socket, daemon log)

set -euo pipefail

cd "$(dirname "$0")/.."
src=$PWD

n=0
say()  { n=$((n + 1)); printf '\ndemo: [%d] %s\n' "$n" "$*"; }
info() { printf '       %s\n' "$*"; }
die()  { printf 'demo: FAILED: %s\n' "$*" >&2; exit 1; }

tmp=
child=
daemon_pid=
cleanup() {
    local rc=$?
    if [[ -n $daemon_pid ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        sleep 0.5
        kill -KILL "$daemon_pid" 2>/dev/null || true
    fi
    if [[ -n $child ]] && kill -0 "$child" 2>/dev/null; then
        kill -KILL "$child" 2>/dev/null || true
    fi
    if (( rc != 0 )) && [[ -n $tmp && -s $tmp/filterd.log ]]; then
        echo "demo: daemon log ($tmp/filterd.log):" >&2
        tail -n 20 "$tmp/filterd.log" >&2
    fi
    if [[ -n $tmp ]]; then
        if [[ ${CBT_DEMO_KEEP:-} == 1 ]]; then
            echo "demo: kept $tmp"
        else
            rm -rf "$tmp"
        fi
    fi
}
trap cleanup EXIT

# ---------------------------------------------------------------------------
say "install packages (tests/install-deps.sh)"
bash tests/install-deps.sh || die "could not install the packages"

# ---------------------------------------------------------------------------
if [[ -n ${CBT_FILTERD:-} ]]; then
    filterd=$CBT_FILTERD
    say "use the daemon in CBT_FILTERD=$filterd (no build)"
else
    filterd=$src/build/filterd/cbt-filterd
    say "build into build/ (meson + ninja)"
    if [[ ! -f build/meson-private/coredata.dat ]]; then
        meson setup build -Dbuildtype=debugoptimized >/dev/null ||
            die "meson setup failed (see build/meson-logs/meson-log.txt)"
    fi
    ninja -C build >/dev/null || die "build failed: run 'ninja -C build' to see why"
fi
[[ -x $filterd ]] || die "$filterd: no such executable"
cbt=${CBT_CLI:-$(dirname "$(dirname "$filterd")")/cbt/cbt}
[[ -x $cbt ]] || die "$cbt: no such executable"
info "daemon: $filterd"
info "cli:    $cbt"

# ---------------------------------------------------------------------------
size=$((256 * 1024 * 1024))
tmp=$(mktemp -d "${TMPDIR:-/tmp}/cbt-demo.XXXXXX")
img=$tmp/disk.img
sock=$tmp/nbd.sock
pidfile=$tmp/filterd.pid
bitmap=$tmp/disk.bitmap
ctl=$tmp/control.sock
repo=$tmp/backups
uri="nbd+unix:///?socket=$sock"

say "create a 256 MiB sparse raw image"
truncate -s "$size" "$img"
info "image: $img ($(du -k "$img" | cut -f1) KiB allocated)"

# ---------------------------------------------------------------------------
say "start cbt-filterd on a private unix socket, tracking writes in a bitmap"
info "$filterd --image $img --format raw --socket $sock --bitmap $bitmap --control $ctl --pid-file $pidfile"
"$filterd" --image "$img" --format raw --socket "$sock" --bitmap "$bitmap" \
    --control "$ctl" --pid-file "$pidfile" >"$tmp/filterd.log" 2>&1 &
child=$!

# The pid file is written once the socket listens.  If the daemon forks
# into the background the pid in the file is not our child; both work.
for _ in $(seq 100); do
    [[ -s $pidfile && -S $sock ]] && break
    if ! kill -0 "$child" 2>/dev/null && [[ ! -s $pidfile ]]; then
        wait "$child" && rc=0 || rc=$?
        die "cbt-filterd exited with status $rc before it wrote $pidfile"
    fi
    sleep 0.1
done
[[ -s $pidfile ]] || die "cbt-filterd wrote no pid file within 10 s"
[[ -S $sock ]] || die "cbt-filterd created no socket $sock within 10 s"
daemon_pid=$(<"$pidfile")
[[ $daemon_pid =~ ^[0-9]+$ ]] || die "$pidfile: not a pid: '$daemon_pid'"
kill -0 "$daemon_pid" 2>/dev/null || die "pid $daemon_pid from $pidfile is not running"
info "running as pid $daemon_pid, serving $uri"

# ---------------------------------------------------------------------------
say "look at the export with nbdinfo"
nbdinfo "$uri" | sed 's/^/       | /' || die "nbdinfo $uri failed"
got=$(nbdinfo --size "$uri") || die "nbdinfo --size $uri failed"
[[ $got == "$size" ]] || die "export size is $got, expected $size"
info "export size $got bytes: OK"

# ---------------------------------------------------------------------------
# offset length pattern-byte: aligned and unaligned, small and large, the
# first and the last block of the disk.
patterns=(
    "0          65536   0x11"
    "1052672    8192    0x22"
    "104857600  1048576 0x33"
    "209715323  1000    0x44"
    "268431360  4096    0x55"
)

# qemu_io CMD...: run qemu-io commands on the export; fail on any error
# (older qemu-io exits 0 after a failed command, so read its output too).
qemu_io() {
    local out args=()
    for c in "$@"; do args+=(-c "$c"); done
    out=$(qemu-io -f raw "${args[@]}" "$uri" 2>&1) || {
        echo "$out" >&2
        return 1
    }
    if grep -qiE 'fail|error|mismatch' <<<"$out"; then
        echo "$out" >&2
        return 1
    fi
}

say "write ${#patterns[@]} patterns through NBD with qemu-io"
for p in "${patterns[@]}"; do
    read -r off len pat <<<"$p"
    qemu_io "write -P $pat $off $len" || die "qemu-io write -P $pat $off $len failed"
    info "wrote $len bytes of $pat at offset $off"
done
qemu_io "flush" || die "qemu-io flush failed"
info "flushed"

say "read the patterns back through NBD (qemu-io read -P verifies each byte)"
for p in "${patterns[@]}"; do
    read -r off len pat <<<"$p"
    qemu_io "read -P $pat $off $len" ||
        die "read back at offset $off: data is not $len bytes of $pat"
    info "offset $off: $len bytes of $pat: OK"
done
qemu_io "read -P 0 50M 1M" || die "an unwritten range at 50 MiB does not read as zeros"
info "unwritten range at 50 MiB reads as zeros: OK"

# ---------------------------------------------------------------------------
say "take a full backup (cbt backup into an empty repository)"
"$cbt" backup --socket "$sock" --control "$ctl" --repo "$repo" 2>&1 | sed 's/^/       | /'
(( ${PIPESTATUS[0]} == 0 )) || die "cbt backup (full) failed"
cp --sparse=always "$img" "$tmp/at-full.img"     # the image at this point
info "copied the image as it is now to compare the restore with"

# ---------------------------------------------------------------------------
say "change some blocks: write, write zeroes, discard"
qemu_io "write -P 0x66 2M 192k" || die "write failed"
qemu_io "write -z 104857600 65536" || die "write -z failed"
qemu_io "discard 0 65536" || die "discard failed"
qemu_io "flush" || die "flush failed"
info "dirty granules now (nbdinfo --map=qemu:dirty-bitmap:cbt):"
nbdinfo --map=qemu:dirty-bitmap:cbt "$uri" | awk '$3 == 1' | sed 's/^/       | /'

say "take an incremental backup while the guest keeps writing"
info "only the dirty granules are copied; the backup holds them as they were"
info "when it began, although a writer rewrites them meanwhile (the daemon"
info "saves the old data before each overwrite: copy-before-write)"
cp --sparse=always "$img" "$tmp/at-incremental.img"   # nothing writes until begin
# A poller on the control socket pauses the backup (SIGSTOP) as soon as its
# checkpoint began, so the writes below land while it runs; on a machine
# fast enough to finish the backup first, they land after it instead.
python3 - "$ctl" "$tmp/backup.pid" >"$tmp/poll.out" <<'PYEOF' &
import json, os, signal, socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
def status():
    f.write('{"execute":"status"}\n'); f.flush()
    return json.loads(f.readline())["return"]
before = status()["bitmap"]["checkpoint"]
open(sys.argv[2] + ".ready", "w").close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
pid = int(open(sys.argv[2]).read())
for _ in range(60000):
    st = status()
    if st["checkpoint"]:
        os.kill(pid, signal.SIGSTOP)
        print("paused")
        sys.exit(0)
    if st["bitmap"]["checkpoint"] != before:
        print("finished")
        sys.exit(0)
    time.sleep(0.0005)
sys.exit(1)
PYEOF
poll_pid=$!
while [[ ! -e $tmp/backup.pid.ready ]]; do sleep 0.01; done
"$cbt" backup --socket "$sock" --control "$ctl" --repo "$repo" >"$tmp/incr.out" 2>&1 &
backup_pid=$!
echo "$backup_pid" >"$tmp/backup.pid.tmp" && mv "$tmp/backup.pid.tmp" "$tmp/backup.pid"
wait "$poll_pid" || die "the backup did not begin a checkpoint"
if [[ $(<"$tmp/poll.out") == paused ]]; then
    info "backup paused inside its checkpoint; the guest now rewrites the blocks"
else
    info "(the backup finished before the guest wrote; the writes land after it)"
fi
qemu_io "write -P 0x77 2M 192k" || die "write during the backup failed"
qemu_io "write -P 0x78 104857600 65536" || die "write during the backup failed"
kill -CONT "$backup_pid" 2>/dev/null || true
wait "$backup_pid" || { sed 's/^/       | /' "$tmp/incr.out"; die "cbt backup (incremental) failed"; }
sed 's/^/       | /' "$tmp/incr.out"
cp --sparse=always "$img" "$tmp/after-backup.img"
kind=$("$cbt" list --repo "$repo" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["backups"][-1]["kind"])') ||
    die "cbt list --json failed"
[[ $kind == incremental ]] || die "the second backup is '$kind', expected incremental"

say "list and verify the repository"
"$cbt" list --repo "$repo" | sed 's/^/       | /'
"$cbt" verify --repo "$repo" | sed 's/^/       | /'
(( ${PIPESTATUS[0]} == 0 )) || die "cbt verify found a problem"

say "restore both points and compare them byte for byte"
"$cbt" restore --repo "$repo" --at 1 --output "$tmp/restored-full.raw" ||
    die "cbt restore --at 1 failed"
cmp "$tmp/restored-full.raw" "$tmp/at-full.img" ||
    die "the restored full backup differs from the image at that point"
info "full backup restored: identical to the image at that point"
"$cbt" restore --repo "$repo" --output "$tmp/restored-latest.raw" ||
    die "cbt restore (latest) failed"
cmp "$tmp/restored-latest.raw" "$tmp/at-incremental.img" ||
    die "the restored incremental differs from the image at that point"
info "incremental restored over the full: identical to the image when that"
info "backup began, not to the image after the writes made during it"
cmp -s "$tmp/at-incremental.img" "$tmp/after-backup.img" &&
    die "the writes during the backup did not change the image"

# ---------------------------------------------------------------------------
say "stop cbt-filterd with SIGTERM"
kill -TERM "$daemon_pid" || die "could not signal pid $daemon_pid"
if [[ $daemon_pid == "$child" ]]; then
    wait "$child" && rc=0 || rc=$?
    child=
    (( rc == 0 )) || die "cbt-filterd exited with status $rc after SIGTERM"
    info "exited with status 0"
else
    for _ in $(seq 100); do
        kill -0 "$daemon_pid" 2>/dev/null || break
        sleep 0.1
    done
    ! kill -0 "$daemon_pid" 2>/dev/null || die "pid $daemon_pid still running 10 s after SIGTERM"
    info "pid $daemon_pid has exited"
fi
daemon_pid=
[[ ! -e $sock ]] || die "cbt-filterd left its socket $sock behind"
info "socket removed: OK"

# ---------------------------------------------------------------------------
say "check the bytes in the image file itself"
cmp "$img" "$tmp/after-backup.img" ||
    die "$img: after shutdown the file differs from what the daemon served"
info "the file holds exactly what was served and backed up: OK"
cmp -n 1048576 -i "$((50 * 1024 * 1024)):0" "$img" /dev/zero ||
    die "$img: the unwritten range at 50 MiB is not zero"
info "unwritten range at 50 MiB is zero on disk: OK"
info "image now has $(du -k "$img" | cut -f1) KiB allocated (still sparse)"

# ---------------------------------------------------------------------------
say "the bitmap the daemon left behind is clean (cbt bitmap info)"
"$cbt" bitmap info "$bitmap" | sed 's/^/       | /'
"$cbt" bitmap info --json "$bitmap" | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["clean"] else 1)' ||
    die "the bitmap is not clean after a clean shutdown"

printf '\ndemo: OK\n'
