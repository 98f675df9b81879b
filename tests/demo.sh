#!/usr/bin/env bash
# A walk through cbt on a throw-away disk image, step by step:
#
#   install packages, build, make a 256 MiB sparse raw image, serve it with
#   cbt-filterd on a private unix socket, write patterns through NBD with
#   qemu-io, read them back, look at the export with nbdinfo, stop the
#   daemon with SIGTERM, and check the bytes in the image file itself.
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
info "daemon: $filterd"

# ---------------------------------------------------------------------------
size=$((256 * 1024 * 1024))
tmp=$(mktemp -d "${TMPDIR:-/tmp}/cbt-demo.XXXXXX")
img=$tmp/disk.img
sock=$tmp/nbd.sock
pidfile=$tmp/filterd.pid
uri="nbd+unix:///?socket=$sock"

say "create a 256 MiB sparse raw image"
truncate -s "$size" "$img"
info "image: $img ($(du -k "$img" | cut -f1) KiB allocated)"

# ---------------------------------------------------------------------------
say "start cbt-filterd on a private unix socket"
info "$filterd --image $img --format raw --socket $sock --pid-file $pidfile"
"$filterd" --image "$img" --format raw --socket "$sock" --pid-file "$pidfile" \
    >"$tmp/filterd.log" 2>&1 &
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

# next: cbt backup --full / incremental / restore / verify (issue: backups)
#   Here the demo will take a full backup, write more patterns, take an
#   incremental backup of just the dirty blocks, restore both into a new
#   image and verify it against the served image.

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
for p in "${patterns[@]}"; do
    read -r off len pat <<<"$p"
    octal=$(printf '%03o' "$pat")
    cmp -n "$len" -i "$off:0" "$img" <(head -c "$len" /dev/zero | tr '\000' "\\$octal") ||
        die "$img: offset $off: the file does not hold $len bytes of $pat"
    info "offset $off: $len bytes of $pat on disk: OK"
done
cmp -n 1048576 -i "$((50 * 1024 * 1024)):0" "$img" /dev/zero ||
    die "$img: the unwritten range at 50 MiB is not zero"
info "unwritten range at 50 MiB is zero on disk: OK"
info "image now has $(du -k "$img" | cut -f1) KiB allocated (still sparse)"

# next: cbt backup --full / incremental / restore / verify (issue: backups)
#   Here the demo will check that the dirty bitmap the daemon saved on
#   shutdown marks exactly the blocks written above.

printf '\ndemo: OK\n'
