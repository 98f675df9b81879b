#!/usr/bin/python3
# Record what NBD clients send during negotiation, for fuzz-nbd-options'
# seeds: a proxy on unix socket LISTEN forwarding to SERVER; for each
# connection, the client's bytes up to 64 KiB are written to
# OUTDIR/PREFIX-N (the input format of fuzz/fuzz-nbd-options.c: the bytes
# after the server's greeting).  Runs until killed.
#
#   record-nbd.py LISTEN SERVER OUTDIR PREFIX
import os, socket, sys, threading

listen, server, outdir, prefix = sys.argv[1:5]
count = 0

def pump(src, dst, rec):
    try:
        while True:
            b = src.recv(65536)
            if not b:
                break
            if rec is not None and len(rec) < 65536:
                rec += b[:65536 - len(rec)]
            dst.sendall(b)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

def serve(c, n):
    s = socket.socket(socket.AF_UNIX)
    s.connect(server)
    rec = bytearray()
    t = threading.Thread(target=pump, args=(s, c, None))
    t.start()
    pump(c, s, rec)
    t.join()
    with open(os.path.join(outdir, "%s-%d" % (prefix, n)), "wb") as f:
        f.write(rec)

l = socket.socket(socket.AF_UNIX)
l.bind(listen)
l.listen(16)
while True:
    c, _ = l.accept()
    count += 1
    threading.Thread(target=serve, args=(c, count)).start()
