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
# Prints "acked=N done=BOOL" at the end; exits 0 unless something other
# than the daemon going away went wrong.

import os
import signal
import sys
import nbd

uri, pid, logpath = sys.argv[1], int(sys.argv[2]), sys.argv[3]
trigger, bs = int(sys.argv[4]), int(sys.argv[5])
signum = getattr(signal, "SIG" + (sys.argv[6] if len(sys.argv) > 6 else "TERM"))


def pattern(i):
    return (b"cbt-blk%09d." % i) * (bs // 17) + b"#" * (bs % 17)


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
