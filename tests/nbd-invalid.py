#!/usr/bin/python3
# Requests a careful client never sends, through libnbd with strict mode
# off: each must fail with the NBD error the contract names and leave the
# connection usable (a normal read on the same handle right after), but
# a WRITE over the 32 MiB maximum, which closes the connection.
#
# usage: nbd-invalid.py URI SIZE
# The export is SIZE bytes (at least 40 MiB), every byte 0x77.

import errno
import sys
import nbd

uri, size = sys.argv[1], int(sys.argv[2])
M = 1024 * 1024
failures = []



def connect():
    global h
    h = nbd.NBD()
    h.connect_uri(uri)
    h.set_strict_mode(0)


def check_alive(what):
    """The same connection still serves a normal read."""
    try:
        if h.pread(513, 1000) != b"\x77" * 513:
            sys.exit(f"read after {what}: wrong data")
    except nbd.Error as e:
        failures.append(f"{what}: connection unusable afterwards: {e}")
        connect()       # go on with the next case on a new connection


connect()


def expect_error(what, fn, *errnos):
    names = "/".join(errno.errorcode[e] for e in errnos)
    try:
        fn()
    except nbd.Error as e:
        if e.errnum not in errnos:
            failures.append(f"{what}: got {e.errnum} ({e}), expected {names}")
    else:
        failures.append(f"{what}: succeeded, expected {names}")
    check_alive(what)


expect_error("read past the end", lambda: h.pread(4096, size), errno.EINVAL)
expect_error("read straddling the end", lambda: h.pread(4096, size - 100),
             errno.EINVAL)
expect_error("read offset+length overflow",
             lambda: h.pread(4096, 2**64 - 2048), errno.EINVAL, errno.EOVERFLOW)
expect_error("read of 32 MiB + 1", lambda: h.pread(32 * M + 1, 0),
             errno.EOVERFLOW, errno.EINVAL)
expect_error("write past the end", lambda: h.pwrite(b"x" * 4096, size),
             errno.ENOSPC)
expect_error("write straddling the end",
             lambda: h.pwrite(b"x" * 4096, size - 100), errno.ENOSPC)
expect_error("write offset+length overflow",
             lambda: h.pwrite(b"x" * 4096, 2**64 - 2048),
             errno.EINVAL, errno.EOVERFLOW, errno.ENOSPC)
# A WRITE over the maximum is the one request that closes the connection:
# its data is never read (nbd-oversized.py has the details).
try:
    h.pwrite(b"x" * (32 * M + 1), 0)
    failures.append("write of 32 MiB + 1: succeeded, expected the connection closed")
except nbd.Error:
    pass
if not (h.aio_is_dead() or h.aio_is_closed()):
    failures.append("write of 32 MiB + 1: connection still up, expected it closed")
connect()
expect_error("write_zeroes past the end", lambda: h.zero(4096, size),
             errno.ENOSPC)
expect_error("trim past the end", lambda: h.trim(4096, size),
             errno.ENOSPC, errno.EINVAL)
expect_error("cache past the end", lambda: h.cache(4096, size), errno.EINVAL)
expect_error("block_status past the end",
             lambda: h.block_status(4096, size, lambda *a: 0), errno.EINVAL)
# Flags that are not defined for the command, or not defined at all.
expect_error("read with an unknown flag", lambda: h.pread(512, 0, 1 << 12),
             errno.EINVAL)
expect_error("write with an unknown flag",
             lambda: h.pwrite(b"x" * 512, 0, 1 << 12), errno.EINVAL)
expect_error("flush with REQ_ONE",
             lambda: h.flush(nbd.CMD_FLAG_REQ_ONE), errno.EINVAL)

# The large requests were not executed: the data is untouched.
if h.pread(4096, 0) != b"\x77" * 4096 or h.pread(4096, size - 4096) != b"\x77" * 4096:
    failures.append("a rejected write changed the image")

# Requests at the exact end are fine.
h.pread(1, size - 1)
h.pwrite(b"\x77", size - 1)
h.zero(1, size - 1)
h.pwrite(b"\x77", size - 1)
h.shutdown()

if failures:
    sys.exit("nbd-invalid:\n  " + "\n  ".join(failures))
