#!/usr/bin/python3
# Write workload that sends SIGTERM to the daemon in the middle of itself.
#
# Writes block i (BS bytes at i*BS, a pattern unique to i) in order, with up
# to 16 requests in flight.  Every acknowledged write is appended to LOG as
# its block number.  Once TRIGGER writes are acknowledged it sends SIGTERM
# to PID and keeps writing until the connection goes away.
#
# usage: nbd-shutdown-writer.py URI PID LOG TRIGGER BS [SIGNAL]
# SIGNAL is TERM (default), INT or KILL.
#        nbd-shutdown-writer.py --verify DISK LOG BS
# checks afterwards that every block listed in LOG holds its pattern in the
# image file DISK; exits non-zero naming the missing blocks.
# Prints "acked=N done=BOOL" at the end; exits 0 unless something other
# than the daemon going away went wrong.

import os
import signal
import sys
import nbd

def pattern_of(i, bs):
    return (b"cbt-blk%09d." % i) * (bs // 17) + b"#" * (bs % 17)


if sys.argv[1] == "--verify":
    disk, acked, bs = sys.argv[2], sys.argv[3], int(sys.argv[4])
    bad = []
    with open(disk, "rb") as f:
        for line in open(acked):
            i = int(line)
            f.seek(i * bs)
            if f.read(bs) != pattern_of(i, bs):
                bad.append(i)
    if bad:
        sys.exit(f"{len(bad)} acknowledged blocks not in the file, e.g. {bad[:10]}")
    sys.exit(0)

uri, pid, logpath = sys.argv[1], int(sys.argv[2]), sys.argv[3]
trigger, bs = int(sys.argv[4]), int(sys.argv[5])
signum = getattr(signal, "SIG" + (sys.argv[6] if len(sys.argv) > 6 else "TERM"))


def pattern(i):
    return pattern_of(i, bs)


h = nbd.NBD()
h.connect_uri(uri)
nblocks = h.get_size() // bs
log = open(logpath, "w")
inflight = {}
nxt = acked = 0
signalled = False
try:
    while nxt < nblocks or inflight:
        while nxt < nblocks and len(inflight) < 16:
            inflight[h.aio_pwrite(pattern(nxt), nxt * bs)] = nxt
            nxt += 1
        h.poll(-1)
        for cookie in list(inflight):
            if h.aio_command_completed(cookie):      # raises if it failed
                log.write(f"{inflight.pop(cookie)}\n")
                log.flush()
                acked += 1
        if acked >= trigger and not signalled:
            os.kill(pid, signum)
            signalled = True
except nbd.Error as e:
    print(f"writer stopped: {e}", file=sys.stderr)
log.close()
print(f"acked={acked} done={nxt >= nblocks and not inflight}")
if not signalled:
    sys.exit("never reached the trigger")
