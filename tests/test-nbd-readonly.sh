#!/usr/bin/env bash
# --read-only: READ_ONLY is advertised, WRITE/WRITE_ZEROES/TRIM sent anyway
# (libnbd with strict mode off) fail with EPERM on a connection that keeps
# working, qemu-io refuses to open it read-write, and the file is unchanged.

source "$(dirname "$0")/functions.sh"
requires nbdinfo qemu-io cmp
requires_python_nbd

disk=$tmp/disk.img
make_pattern_file "$disk" $((1024 * 1024)) 0x55
cp "$disk" "$tmp/orig.img"

start_filterd --image "$disk" --read-only

nbdinfo --is read-only "$uri" || die "nbdinfo --is read-only: false"
status=0
nbdinfo --can write "$uri" || status=$?
[ $status -eq 2 ] || die "nbdinfo --can write: status $status, expected 2"
for c in connect read flush; do
    nbdinfo --can $c "$uri" || die "nbdinfo --can $c: false on a read-only export"
done

# qemu's client notices READ_ONLY and refuses a writable open.
qio_fails 'Permission denied' -f raw "$uri" -c 'write -P 0x66 0 4k'
qio -f raw -r "$uri" -c 'read -P 0x55 0 1M'

"$PYTHON" - "$uri" <<'PY'
import errno, sys
import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
if not h.is_read_only():
    sys.exit("READ_ONLY not advertised")
h.set_strict_mode(0)

def expect_eperm(what, fn):
    try:
        fn()
    except nbd.Error as e:
        if e.errnum != errno.EPERM:
            sys.exit(f"{what}: got errno {e.errnum} ({e}), expected EPERM")
    else:
        sys.exit(f"{what}: succeeded on a read-only export")
    # The same connection still serves reads.
    if h.pread(4096, 8192) != b"\x55" * 4096:
        sys.exit(f"read after {what}: wrong data")

expect_eperm("write", lambda: h.pwrite(b"\x66" * 4096, 0))
expect_eperm("write FUA", lambda: h.pwrite(b"\x66" * 10, 7, nbd.CMD_FLAG_FUA))
expect_eperm("write_zeroes", lambda: h.zero(65536, 0))
expect_eperm("trim", lambda: h.trim(65536, 0))
h.flush()
h.shutdown()
PY

stop_filterd
cmp "$disk" "$tmp/orig.img" || die "read-only export changed the file"
