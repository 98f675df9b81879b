#!/usr/bin/python3
# Read a point-in-time view (NAME@checkpoint) over several connections in
# random order, with many reads in flight, and compare every byte with the
# disk as it was at checkpoint-begin (a raw file); optionally release
# (TRIM) each range once it was read and checked, as cbt backup does.
# Meant to run while a guest writes to the main export, so reads race the
# daemon's copies, TRIMs race them too, and both exports use multi-conn.
#
# usage: nbd-pit-reader.py SOCKET EXPORT EXPECTED.raw CONNS [--release]
# Exit 0 when every byte matched; 1 with the first mismatch or error.
import random, sys
import nbd

sock, export, expected, conns = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
release = "--release" in sys.argv[5:]
CHUNK = 1 << 20
DEPTH = 16

with open(expected, "rb") as f:
    want = f.read()
size = len(want)
order = list(range(0, size, CHUNK))
random.shuffle(order)

handles = []
for _ in range(conns):
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(sock)
    if h.get_size() != size:
        sys.exit("export size %d, expected %d" % (h.get_size(), size))
    handles.append(h)
if conns > 1 and not handles[0].can_multi_conn():
    sys.exit("the view does not offer multi-conn")

bad = []
pending = {i: [] for i in range(conns)}   # per handle: (cookie, off, buf)

def check(off, buf):
    got = bytes(buf)
    if got != want[off:off + len(got)]:
        for i in range(len(got)):
            if got[i] != want[off + i]:
                bad.append("byte at %d: got 0x%02x, expected 0x%02x" %
                           (off + i, got[i], want[off + i]))
                return

i = 0
while (order or any(pending.values())) and not bad:
    for k, h in enumerate(handles):
        while order and len(pending[k]) < DEPTH:
            off = order.pop()
            n = min(CHUNK, size - off)
            buf = nbd.Buffer(n)
            pending[k].append((h.aio_pread(buf, off), off, buf))
        h.poll(0)
        still = []
        for cookie, off, buf in pending[k]:
            if h.aio_command_completed(cookie):
                check(off, buf.to_bytearray())
                if release:
                    h.trim(len(buf.to_bytearray()), off)
            else:
                still.append((cookie, off, buf))
        pending[k] = still
    if any(pending.values()):
        handles[i % conns].poll(1)   # wait a little on one of them
        i += 1

if bad:
    sys.exit("the view differs from the disk at checkpoint-begin: " + bad[0])
print("read %d bytes of the view over %d connections%s: all as at checkpoint-begin"
      % (size, conns, ", releasing" if release else ""))
