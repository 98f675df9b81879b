#!/usr/bin/python3
# Throw malformed input at cbt-filterd from many connections: random bytes
# before and during option negotiation, random option headers and lengths,
# and, once in transmission, requests with the right magic but random
# command, flags, offsets and lengths (WRITE payloads cut short).  Each
# connection is then dropped.  Seeded, so a failure can be replayed.
#
# usage: nbd-garbage.py SOCKET SEED CONNECTIONS
import os, random, socket, struct, sys

path, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(seed)
IHAVEOPT = 0x49484156454F5054
REQ = 0x25609513

def conn():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    return s

def recv_exact(s, k):
    b = b""
    while len(b) < k:
        c = s.recv(k - len(b))
        if not c:
            raise ConnectionError("closed")
        b += c
    return b

def junk(k):
    return bytes(rnd.getrandbits(8) for _ in range(k))

def drain(s):
    # Read whatever the server has answered so far, without waiting.
    s.setblocking(False)
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass
    s.settimeout(5)

stats = {"completed": 0, "dropped by server": 0, "requests": 0}
for i in range(n):
    phase = rnd.randrange(4)
    try:
        s = conn()
        if phase == 0:                       # garbage instead of client flags
            recv_exact(s, 18)
            s.sendall(junk(rnd.randrange(1, 64)))
        elif phase == 1:                     # random option headers/lengths
            recv_exact(s, 18)
            s.sendall(struct.pack(">I", rnd.choice([0, 1, 2, 3, 0xffffffff])))
            for _ in range(rnd.randrange(1, 8)):
                opt = rnd.choice([1, 3, 6, 7, 8, 9, 10, 11, 42, 0xffffffff])
                ln = rnd.choice([0, 1, 4, 7, 100, 5000, 70000, 0xffffffff])
                body = junk(min(ln, rnd.randrange(0, 300)))
                magic = IHAVEOPT if rnd.random() < 0.9 else rnd.getrandbits(64)
                s.sendall(struct.pack(">QII", magic, opt, ln) + body)
                drain(s)
        else:                                # transmission with bad requests
            recv_exact(s, 18)
            s.sendall(struct.pack(">I", 3))
            if phase == 3:                   # structured replies + contexts
                s.sendall(struct.pack(">QII", IHAVEOPT, 8, 0))
                q = b"base:allocation"
                data = struct.pack(">I", 0) + struct.pack(">I", 1) + struct.pack(">I", len(q)) + q
                s.sendall(struct.pack(">QII", IHAVEOPT, 10, len(data)) + data)
            s.sendall(struct.pack(">QII", IHAVEOPT, 1, 0))    # EXPORT_NAME ""
            drain(s)
            for _ in range(rnd.randrange(1, 40)):
                typ = rnd.choice([0, 1, 3, 4, 5, 6, 7, 8, 99])
                flags = rnd.choice([0, 1, 2, 4, 8, 16, 0xffff])
                off = rnd.choice([0, 4096, 1 << 20, (64 << 20) - 1, 1 << 62, 2**64 - 1])
                ln = rnd.choice([0, 1, 512, 4096, 65537, 32 << 20, (32 << 20) + 1, 0xffffffff])
                magic = REQ if rnd.random() < 0.95 else rnd.getrandbits(32)
                pkt = struct.pack(">IHHQQI", magic, flags, typ, rnd.getrandbits(64), off, ln)
                if typ == 1:                 # WRITE: some or all of the payload
                    pkt += junk(min(ln, rnd.choice([0, 10, 512, 4096])))
                s.sendall(pkt)
                stats["requests"] += 1
                drain(s)
        s.close()
        stats["completed"] += 1
    except (OSError, ConnectionError):
        stats["dropped by server"] += 1      # the server may hang up: fine
print("garbage on %d connections (seed %d): %s" % (n, seed, stats))
# The run must have reached the parsers, not just bounced off.
if stats["completed"] < n // 4 or stats["requests"] < n:
    sys.exit("too little garbage got through: %s" % stats)
