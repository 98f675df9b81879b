#!/usr/bin/python3
# Structured replies and base:allocation through libnbd, on an 8 MiB sparse
# export holding 0xa1 at [1M, 1M+64k) and 0xa2 at [5M, 5M+128k), holes
# elsewhere (laid out by test-nbd-map.sh).  Exits non-zero with a reason on
# the first mismatch.
#
# usage: nbd-structured.py URI

import sys
import nbd

M = 1024 * 1024
K = 1024
layout = [(0, M, None), (M, 64 * K, 0xa1), (M + 64 * K, 4 * M - 64 * K, None),
          (5 * M, 128 * K, 0xa2), (5 * M + 128 * K, 3 * M - 128 * K, None)]


def expected(off, count):
    out = bytearray(count)
    for start, length, byte in layout:
        if byte is None:
            continue
        lo, hi = max(off, start), min(off + count, start + length)
        if lo < hi:
            out[lo - off:hi - off] = bytes([byte]) * (hi - lo)
    return bytes(out)


def fail(msg):
    sys.exit(f"nbd-structured: {msg}")


h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(sys.argv[1])
if not h.get_structured_replies_negotiated():
    fail("structured replies not negotiated")
if not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
    fail("base:allocation not negotiated")
size = h.get_size()
if size != 8 * M:
    fail(f"size {size}")


def read_chunks(count, off, flags=0):
    chunks = []

    def cb(subbuf, offset, status, err):
        chunks.append((offset, len(subbuf), status, bytes(subbuf)))
        return 0

    buf = h.pread_structured(count, off, cb, flags)
    # Every byte is covered by exactly one chunk, and the buffer and the
    # chunks agree with the layout.
    chunks.sort()
    pos = off
    for c_off, c_len, status, data in chunks:
        if c_off != pos:
            fail(f"read {off}+{count}: chunk at {c_off}, expected {pos}: {chunks}")
        if status == nbd.READ_HOLE and data != bytes(c_len):
            fail(f"read {off}+{count}: hole chunk {c_off}+{c_len} not zero")
        if status == nbd.READ_DATA and data != expected(c_off, c_len):
            fail(f"read {off}+{count}: data chunk {c_off}+{c_len} wrong bytes")
        pos += c_len
    if pos != off + count:
        fail(f"read {off}+{count}: chunks end at {pos}")
    if bytes(buf) != expected(off, count):
        fail(f"read {off}+{count}: wrong bytes")
    return [(c_off, c_len, status) for c_off, c_len, status, _ in chunks]


# Plain reads across data/hole boundaries at odd offsets.
for off, count in [(0, 4096), (M - 3, 7), (M + 64 * K - 5, 10),
                   (5 * M - 4096, 200 * K), (0, 8 * M), (8 * M - 1, 1)]:
    read_chunks(count, off)

# A read entirely inside a hole: the server sends a hole chunk (no payload).
chunks = read_chunks(256 * K, 2 * M)
if not any(s == nbd.READ_HOLE for _, _, s in chunks):
    fail(f"read of a hole at 2M: no hole chunk, got {chunks}")

# DF: one data chunk for the whole range, even over holes.
for off, count in [(2 * M, 256 * K), (M - 4096, 72 * K)]:
    chunks = read_chunks(count, off, nbd.CMD_FLAG_DF)
    if chunks != [(off, count, nbd.READ_DATA)]:
        fail(f"DF read {off}+{count}: expected one data chunk, got {chunks}")


def extents(count, off, flags=0):
    got = []

    def cb(metacontext, offset, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            got.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(count, off, cb, flags)
    return got


# REQ_ONE: exactly one extent, starting where asked, no longer than asked.
for off, want_type in [(0, 3), (M, 0), (M + 4096, 0), (5 * M, 0),
                       (7 * M, 3)]:
    got = extents(64 * K, off, nbd.CMD_FLAG_REQ_ONE)
    if len(got) != 1:
        fail(f"block_status REQ_ONE at {off}: {len(got)} extents: {got}")
    length, flags = got[0]
    if length == 0 or length > 64 * K or (flags & 3) != want_type:
        fail(f"block_status REQ_ONE at {off}: got {got}, want type {want_type}")

# Without REQ_ONE the extents cover the start of the range in order and
# match the layout where they overlap it.
got = extents(8 * M, 0)
pos = 0
for length, flags in got:
    for start, ln, byte in layout:
        lo, hi = max(pos, start), min(pos + length, start + ln)
        if lo < hi and (flags & 3) != (0 if byte is not None else 3):
            fail(f"extent {pos}+{length} type {flags} overlaps {start}+{ln}")
    pos += length
if pos == 0 or pos > 8 * M:
    fail(f"block_status: extents cover {pos} bytes: {got}")

h.shutdown()
