#!/usr/bin/python3
# Requests longer than the 32 MiB maximum payload, on the raw protocol
# (libnbd will not send them): a WRITE header that announces more than
# the maximum, followed by only 4 KiB of its data, must make the daemon
# close the connection at once (as qemu-nbd does) instead of waiting for
# data that may never come; a READ of more than the maximum gets an
# error reply and the connection goes on.  A client connected before
# them is served throughout.  Every wait has a 10 s hang guard: a daemon
# that waits longer fails the test.
#
# usage: nbd-oversized.py SOCKET SIZE
# The export is SIZE bytes (at least 40 MiB), every byte 0x77.

import errno
import socket
import struct
import sys

import nbdraw

path, size = sys.argv[1], int(sys.argv[2])
M = 1024 * 1024
MAX = 32 * M
SIMPLE_MAGIC = 0x67446698
GUARD = 10                           # seconds: a hang guard only
failures = []


def client():
    s = nbdraw.negotiated(path)
    s.settimeout(GUARD)
    return s


def recv_exact(s, n):
    """Exactly @n bytes (into one buffer: 32 MiB in small pieces)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = s.recv_into(view[got:])
        if k == 0:
            sys.exit("server closed the connection")
        got += k
    return bytes(buf)


def simple_reply(s, cookie, length):
    """The simple reply to @cookie: (error, data)."""
    magic, err, got = struct.unpack(">IIQ", recv_exact(s, 16))
    if magic != SIMPLE_MAGIC or got != cookie:
        sys.exit(f"bad reply: magic {magic:#x} cookie {got}, expected {cookie}")
    return err, (recv_exact(s, length) if err == 0 else b"")


def read_ok(s, what, cookie):
    s.sendall(nbdraw.request(nbdraw.CMD_READ, 4096, 4096, cookie=cookie))
    err, data = simple_reply(s, cookie, 4096)
    if err or data != b"\x77" * 4096:
        failures.append(f"{what}: a 4 KiB read failed (error {err})")


def closed_within_guard(s):
    """True once the server closed @s; False if it was still open after
    GUARD seconds (replies to earlier requests are skipped)."""
    try:
        while s.recv(65536):
            pass
        return True
    except socket.timeout:
        return False
    except ConnectionError:
        return True


bystander = client()
read_ok(bystander, "before the oversized requests", 1)

# 4 GiB does not fit the 32-bit length: its stand-in is 4 GiB - 1.
for length in (33 * M, 64 * M, 600 * M, 0xFFFFFFFF):
    what = f"WRITE of {length} bytes with 4 KiB of data"
    s = client()
    read_ok(s, what + " (before)", 7)
    try:
        s.sendall(nbdraw.request(nbdraw.CMD_WRITE, 0, length, cookie=8) +
                  b"\x55" * 4096)
    except (BrokenPipeError, ConnectionResetError):
        pass                         # closed already: what we want
    if not closed_within_guard(s):
        failures.append(f"{what}: connection still open after {GUARD} s")
    s.close()
    read_ok(bystander, what + " (another client)", 9)

# READ above the maximum: an error reply, and the connection goes on.
s = client()
for length in (MAX + 1, 600 * M, 0xFFFFFFFF):
    s.sendall(nbdraw.request(nbdraw.CMD_READ, 0, length, cookie=20))
    try:
        err, _ = simple_reply(s, 20, 0)
    except socket.timeout:
        sys.exit(f"READ of {length} bytes: no reply within {GUARD} s")
    if err not in (errno.EOVERFLOW, errno.EINVAL):
        failures.append(f"READ of {length} bytes: error {err}, expected EOVERFLOW or EINVAL")
    read_ok(s, f"after a READ of {length} bytes", 21)

# The maximum itself is served, both ways.
s.sendall(nbdraw.request(nbdraw.CMD_READ, 0, MAX, cookie=30))
err, data = simple_reply(s, 30, MAX)
if err or data != b"\x77" * MAX:
    failures.append(f"READ of exactly {MAX} bytes failed (error {err})")
s.sendall(nbdraw.request(nbdraw.CMD_WRITE, 0, MAX, cookie=31) + b"\x77" * MAX)
err, _ = simple_reply(s, 31, 0)
if err:
    failures.append(f"WRITE of exactly {MAX} bytes failed (error {err})")
s.sendall(nbdraw.request(nbdraw.CMD_DISC, 0, 0))
s.close()

read_ok(bystander, "at the end", 40)
bystander.sendall(nbdraw.request(nbdraw.CMD_DISC, 0, 0))
bystander.close()

if failures:
    sys.exit("nbd-oversized:\n  " + "\n  ".join(failures))
print("nbd-oversized: OK")
