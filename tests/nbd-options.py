#!/usr/bin/python3
# Fixed newstyle negotiation and transmission edge cases over raw unix
# sockets (no NBD library, so we can send what libraries refuse to):
# unknown options, LIST, INFO/GO with right and wrong names, EXPORT_NAME,
# ABORT, SET_META_CONTEXT, unknown commands and flags, a bad request magic
# (closes that connection only), and clients that hang up mid-handshake.
#
# usage: nbd-options.py SOCKET EXPORT-NAME SIZE
# The export is SIZE bytes, every byte 0x5a, and has no description.

import socket
import struct
import sys

path, export, size = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])

NBDMAGIC = 0x4e42444d41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3e889045565a9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCT_MAGIC = 0x668e33ef

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
ERR = 1 << 31
REP_ERR_UNSUP, REP_ERR_UNKNOWN = ERR + 1, ERR + 6
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_BLOCK_STATUS = 0, 1, 2, 7
CHUNK_DATA, CHUNK_HOLE, CHUNK_BLOCK_STATUS = 1, 2, 5
CHUNK_ERROR = (1 << 15) + 1
EINVAL = 22

F_HAS_FLAGS, F_READ_ONLY, F_SEND_FLUSH, F_SEND_FUA = 1, 2, 4, 8
F_SEND_TRIM, F_SEND_WRITE_ZEROES, F_SEND_DF = 0x20, 0x40, 0x80
F_CAN_MULTI_CONN, F_SEND_CACHE, F_SEND_FAST_ZERO = 0x100, 0x400, 0x800
# SEND_DF only means something once structured replies are negotiated;
# it is required in the GO reply that follows STRUCTURED_REPLY.
WANT_FLAGS = (F_HAS_FLAGS | F_SEND_FLUSH | F_SEND_FUA | F_SEND_TRIM |
              F_SEND_WRITE_ZEROES | F_CAN_MULTI_CONN |
              F_SEND_CACHE | F_SEND_FAST_ZERO)

failures = []


def check(cond, msg):
    if not cond:
        failures.append(msg)
    return cond


def fatal(msg):
    sys.exit(f"nbd-options: {msg}" + "".join(f"\n  also: {f}" for f in failures))


class Conn:
    def __init__(self, name):
        self.name = name
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(30)     # a hang guard only
        self.s.connect(path)

    def recv(self, n):
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.s.recv(n - len(buf))
            except socket.timeout:
                fatal(f"{self.name}: no reply within 30 s")
            if not chunk:
                fatal(f"{self.name}: connection closed, wanted {n - len(buf)} more bytes")
            buf += chunk
        return buf

    def closed_by_server(self):
        """True if the server closes the connection (EOF or reset)."""
        try:
            while True:
                if not self.s.recv(4096):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def handshake(self, cflags=3):
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        if magic != NBDMAGIC or opt != IHAVEOPT:
            fatal(f"{self.name}: bad greeting {magic:x} {opt:x}")
        check(hflags & 1, f"{self.name}: FIXED_NEWSTYLE not offered")
        check(hflags & 2, f"{self.name}: NO_ZEROES not offered")
        self.s.sendall(struct.pack(">I", cflags))

    def opt(self, opt, data=b""):
        self.s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def reply(self, opt):
        magic, ropt, rtype, length = struct.unpack(">QIII", self.recv(20))
        if magic != REPLY_MAGIC:
            fatal(f"{self.name}: bad option reply magic {magic:x}")
        check(ropt == opt, f"{self.name}: reply for option {ropt}, sent {opt}")
        return rtype, self.recv(length)

    def replies(self, opt):
        """All replies up to the final ACK or error."""
        out = []
        while True:
            rtype, data = self.reply(opt)
            out.append((rtype, data))
            if rtype == REP_ACK or rtype & ERR:
                return out

    def request(self, cmd, handle, offset, length, flags=0, data=b"",
                magic=REQ_MAGIC):
        self.s.sendall(struct.pack(">IHHQQI", magic, flags, cmd, handle,
                                   offset, length) + data)

    def simple_reply(self, handle, length):
        magic, err, h = struct.unpack(">IIQ", self.recv(16))
        if magic != SIMPLE_MAGIC:
            fatal(f"{self.name}: expected a simple reply, magic {magic:x}")
        check(h == handle, f"{self.name}: reply handle {h}, sent {handle}")
        return err, (self.recv(length) if err == 0 else b"")

    def struct_chunks(self, handle):
        """Chunks of one reply (simple replies are allowed for errors)."""
        chunks = []
        while True:
            magic, = struct.unpack(">I", self.recv(4))
            if magic == SIMPLE_MAGIC:
                err, h = struct.unpack(">IQ", self.recv(12))
                check(h == handle, f"{self.name}: reply handle {h}, sent {handle}")
                return [("simple", err, b"")]
            if magic != STRUCT_MAGIC:
                fatal(f"{self.name}: bad reply magic {magic:x}")
            flags, ctype, h, length = struct.unpack(">HHQI", self.recv(16))
            check(h == handle, f"{self.name}: chunk handle {h}, sent {handle}")
            chunks.append((ctype, flags, self.recv(length)))
            if flags & 1:   # NBD_REPLY_FLAG_DONE
                return chunks


def name_info(name, infos=()):
    return (struct.pack(">I", len(name)) + name +
            struct.pack(">H", len(infos)) +
            b"".join(struct.pack(">H", i) for i in infos))


def reply_error(chunks):
    """The NBD error of a reply: 0 for success."""
    for c in chunks:
        if c[0] == "simple":
            return c[1]
        if c[0] & (1 << 15):
            return struct.unpack(">I", c[2][:4])[0]
    return 0


def go(c, name=export, infos=()):
    c.opt(OPT_GO, name_info(name, infos))
    return c.replies(OPT_GO)


def check_export_info(who, reps, want=WANT_FLAGS):
    info = {}
    for rtype, data in reps:
        if rtype == REP_INFO:
            info[struct.unpack(">H", data[:2])[0]] = data[2:]
    if not check(INFO_EXPORT in info, f"{who}: no NBD_INFO_EXPORT"):
        return
    esize, eflags = struct.unpack(">QH", info[INFO_EXPORT])
    check(esize == size, f"{who}: export size {esize}, expected {size}")
    check(eflags & want == want and not eflags & F_READ_ONLY,
          f"{who}: transmission flags {eflags:#x}, want {want:#x} set")
    if INFO_BLOCK_SIZE in info:
        bs = struct.unpack(">III", info[INFO_BLOCK_SIZE])
        check(bs == (1, 4096, 32 * 1024 * 1024), f"{who}: block sizes {bs}")
    if INFO_NAME in info:
        check(info[INFO_NAME] == export, f"{who}: NBD_INFO_NAME {info[INFO_NAME]}")
    return info


# --- Connection A: option haggling, then transmission with structured
# replies, then a bad request magic.
a = Conn("A")
a.handshake()

a.opt(0x7777, b"hello")
r = a.replies(0x7777)
check(r[-1][0] == REP_ERR_UNSUP, f"A: unknown option: reply {r[-1][0]:#x}, want ERR_UNSUP")

a.opt(OPT_LIST)
r = a.replies(OPT_LIST)
check(r[-1][0] == REP_ACK, f"A: LIST ended with {r[-1][0]:#x}")
names = [d[4:4 + struct.unpack(">I", d[:4])[0]] for t, d in r if t == REP_SERVER]
check(names == [export], f"A: LIST names {names}, want [{export!r}]")

a.opt(OPT_INFO, name_info(b"no-such-export"))
r = a.replies(OPT_INFO)
check(r[-1][0] == REP_ERR_UNKNOWN, f"A: INFO wrong name: reply {r[-1][0]:#x}, want ERR_UNKNOWN")

a.opt(OPT_INFO, name_info(export, [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]))
r = a.replies(OPT_INFO)
check(r[-1][0] == REP_ACK, f"A: INFO: final reply {r[-1][0]:#x}")
info = check_export_info("A: INFO", r)
check(info and INFO_BLOCK_SIZE in info, "A: INFO: no NBD_INFO_BLOCK_SIZE although requested")

a.opt(OPT_STRUCTURED_REPLY)
r = a.replies(OPT_STRUCTURED_REPLY)
check(r[-1][0] == REP_ACK, f"A: STRUCTURED_REPLY: reply {r[-1][0]:#x}")

meta_req = (struct.pack(">I", len(export)) + export + struct.pack(">I", 1) +
            struct.pack(">I", len(b"base:allocation")) + b"base:allocation")
a.opt(OPT_LIST_META, meta_req)
r = a.replies(OPT_LIST_META)
check(r[-1][0] == REP_ACK and any(t == REP_META and d[4:] == b"base:allocation" for t, d in r),
      f"A: LIST_META_CONTEXT: {r}")
a.opt(OPT_SET_META, meta_req)
r = a.replies(OPT_SET_META)
metas = [(struct.unpack(">I", d[:4])[0], d[4:]) for t, d in r if t == REP_META]
check(r[-1][0] == REP_ACK and len(metas) == 1 and metas[0][1] == b"base:allocation",
      f"A: SET_META_CONTEXT: {r}")
meta_id = metas[0][0] if metas else 0

r = go(a, export, [INFO_BLOCK_SIZE])
if r[-1][0] != REP_ACK:
    fatal(f"A: GO failed: {r}")
check_export_info("A: GO", r, WANT_FLAGS | F_SEND_DF)

# --- Connection B: the old EXPORT_NAME option, no structured replies.
b = Conn("B")
b.handshake()
b.opt(OPT_EXPORT_NAME, export)
bsize, bflags = struct.unpack(">QH", b.recv(10))   # no zero padding: NO_ZEROES
check(bsize == size, f"B: EXPORT_NAME size {bsize}")
check(bflags & WANT_FLAGS == WANT_FLAGS, f"B: EXPORT_NAME flags {bflags:#x}")

# A: transmission.
a.request(CMD_READ, 1, 1000, 3000)
data = bytearray(3000)
for ctype, _, payload in a.struct_chunks(1):
    if ctype == CHUNK_DATA:
        off, = struct.unpack(">Q", payload[:8])
        data[off - 1000:off - 1000 + len(payload) - 8] = payload[8:]
    elif ctype == CHUNK_HOLE:
        pass
    elif ctype != 0:
        fatal(f"A: read: unexpected chunk type {ctype}")
check(bytes(data) == b"\x5a" * 3000, "A: structured read: wrong data")

a.request(42, 2, 0, 0)
check(reply_error(a.struct_chunks(2)) == EINVAL, "A: unknown command 42: not EINVAL")
a.request(CMD_READ, 3, 0, 512, flags=1 << 12)
check(reply_error(a.struct_chunks(3)) == EINVAL, "A: read with flag 1<<12: not EINVAL")
a.request(CMD_BLOCK_STATUS, 4, 0, 4096)
chunks = a.struct_chunks(4)
bs = [c for c in chunks if c[0] == CHUNK_BLOCK_STATUS]
check(len(bs) == 1 and struct.unpack(">I", bs[0][2][:4])[0] == meta_id,
      f"A: block status: chunks {chunks}")
a.request(CMD_READ, 5, 0, 16)       # still fine after the errors
check(reply_error(a.struct_chunks(5)) == 0, "A: read after errors failed")

a.request(CMD_READ, 6, 0, 512, magic=0x12345678)
check(a.closed_by_server(), "A: bad request magic: connection not closed")

# B was not affected: simple replies, data intact.
b.request(CMD_READ, 7, size - 700, 700)
err, data = b.simple_reply(7, 700)
check(err == 0 and data == b"\x5a" * 700, f"B: read after A's bad magic: err {err}")
b.request(CMD_DISC, 8, 0, 0)
check(b.closed_by_server(), "B: DISC: connection not closed")

# --- C: GO with the wrong name is refused and the session continues.
c = Conn("C")
c.handshake()
r = go(c, b"no-such-export")
check(r[-1][0] == REP_ERR_UNKNOWN, f"C: GO wrong name: {r[-1][0]:#x}, want ERR_UNKNOWN")
r = go(c)
check(r[-1][0] == REP_ACK, f"C: GO after a refused GO: {r[-1][0]:#x}")
c.request(CMD_READ, 9, 0, 100)
err, data = c.simple_reply(9, 100)
check(err == 0 and data == b"\x5a" * 100, f"C: read: err {err}")
c.s.close()

# --- D: ABORT ends the negotiation (an ACK before closing is optional).
d = Conn("D")
d.handshake()
d.opt(OPT_ABORT)
check(d.closed_by_server(), "D: ABORT: connection not closed")

# --- E: EXPORT_NAME with an unknown name: the server closes.
e = Conn("E")
e.handshake()
e.opt(OPT_EXPORT_NAME, b"no-such-export")
check(e.closed_by_server(), "E: EXPORT_NAME wrong name: connection not closed")

# --- Clients that misbehave and vanish must not hurt the daemon.
Conn("F").s.close()                                  # silent hang-up
g = Conn("G"); g.handshake(); g.s.close()            # hang-up after flags
h = Conn("H"); h.handshake()
h.s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, 0xffffffff) + b"x" * 100)
h.s.close()                                          # huge option length
i = Conn("I"); i.recv(18); i.s.sendall(b"\xff" * 64); i.s.close()

# A fresh client still gets served.
z = Conn("Z")
z.handshake()
r = go(z)
check(r[-1][0] == REP_ACK, f"Z: GO after misbehaving clients: {r[-1][0]:#x}")
z.request(CMD_READ, 10, 4096, 4096)
err, data = z.simple_reply(10, 4096)
check(err == 0 and data == b"\x5a" * 4096, f"Z: read: err {err}")

if failures:
    sys.exit("nbd-options:\n  " + "\n  ".join(failures))
