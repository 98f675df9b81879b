#!/usr/bin/python3
# Checkpoint-begin while writes are in flight: every granule written must be
# dirty in the frozen bitmap or in the new active one (never lost), and
# everything written before the checkpoint must be in the frozen one.
#
# usage: nbd-checkpoint-race.py NBD_SOCKET CONTROL_SOCKET
import json, socket, sys, threading
import nbd

sock, csock = sys.argv[1], sys.argv[2]
G = 65536
N = 1024                       # granules written: 64 MiB of a 128 MiB image

def control(req):
    s = socket.socket(socket.AF_UNIX)
    s.connect(csock)
    f = s.makefile("rw")
    f.write(json.dumps(req) + "\n")
    f.flush()
    r = json.loads(f.readline())
    s.close()
    if "error" in r:
        sys.exit("control: %s" % r["error"])
    return r["return"]

h = nbd.NBD()
h.connect_unix(sock)
buf = b"\xa5" * 4096
for g in range(N // 2):        # before the checkpoint
    h.pwrite(buf, g * G)

done = threading.Event()
def writer():
    # Second half with up to 64 requests in flight at a time.
    w = nbd.NBD()
    w.connect_unix(sock)
    for g in range(N // 2, N):
        w.aio_pwrite(buf, g * G)
        while w.aio_in_flight() >= 64:
            w.poll(-1)
    while w.aio_in_flight() > 0:
        w.poll(-1)
    w.flush()
    w.shutdown()
    done.set()

t = threading.Thread(target=writer)
t.start()
st = control({"execute": "checkpoint-begin"})
t.join()
assert done.is_set()
cp = st["checkpoint"]
assert cp and cp["trusted"], st

r = nbd.NBD()
r.add_meta_context(st["bitmap"]["context"])
r.add_meta_context(cp["context"])
r.connect_unix(sock)
size = r.get_size()
dirty = {st["bitmap"]["context"]: set(), cp["context"]: set()}

def cb(metacontext, offset, entries, err):
    pos = offset
    for i in range(0, len(entries), 2):
        length, flags = entries[i], entries[i + 1]
        if flags & 1:
            for g in range(pos // G, (pos + length + G - 1) // G):
                dirty[metacontext].add(g)
        pos += length
    return 0

off = 0
while off < size:
    n = min(size - off, 32 << 20)
    r.block_status(n, off, cb)
    off += n
active, frozen = dirty[st["bitmap"]["context"]], dirty[cp["context"]]
lost = set(range(N)) - active - frozen
assert not lost, "granules lost by the checkpoint: %s" % sorted(lost)[:10]
before = set(range(N // 2)) - frozen
assert not before, "granules written before the checkpoint not frozen: %s" % sorted(before)[:10]
extra = (active | frozen) - set(range(N))
assert not extra, "granules dirty that nobody wrote: %s" % sorted(extra)[:10]
print("race ok: %d frozen, %d active" % (len(frozen), len(active)))
