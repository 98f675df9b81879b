"""Raw NBD client pieces for tests that must misbehave on purpose
(stall, never read replies, reset): what libnbd will not do.

    import nbdraw
    s = nbdraw.negotiated(path)          # fixed newstyle, EXPORT_NAME ""
    s.sendall(nbdraw.request(nbdraw.CMD_READ, 0, 4096, cookie=1))

Tests run with PYTHONPATH pointing at tests/ (functions.sh exports it).
"""
import socket
import struct

OPT_MAGIC = 0x49484156454F5054          # "IHAVEOPT"
REQUEST_MAGIC = 0x25609513
OPT_EXPORT_NAME = 1
OPT_STARTTLS = 5
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2
FLAGS_FIXED_NO_ZEROES = 3


def recvn(s, n):
    """Exactly @n bytes from @s; SystemExit if the server closes first."""
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise SystemExit("server closed the connection")
        b += c
    return b


def connect(path_or_port):
    """A connected socket: a unix socket path, or a TCP port on 127.0.0.1."""
    if isinstance(path_or_port, int):
        return socket.create_connection(("127.0.0.1", path_or_port))
    s = socket.socket(socket.AF_UNIX)
    s.connect(path_or_port)
    return s


def option(opt, data=b""):
    return struct.pack(">QII", OPT_MAGIC, opt, len(data)) + data


def request(cmd, offset, length, cookie=0, flags=0):
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def negotiated(path_or_port, name=b""):
    """A socket in transmission after NBD_OPT_EXPORT_NAME @name."""
    s = connect(path_or_port)
    recvn(s, 18)
    s.sendall(struct.pack(">I", FLAGS_FIXED_NO_ZEROES))
    s.sendall(option(OPT_EXPORT_NAME, name))
    recvn(s, 10)
    return s


def reset(s):
    """Close without a clean shutdown (SO_LINGER 0)."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
