#!/usr/bin/env bash
# A bitmap file that claims a huge image costs what the file really holds,
# not what its header says.  A valid bitmap of a 64 MiB image is rewritten
# (header, directory and checksums, as bitmap-format.md says) to claim an
# image of 2^50 bytes and extended, sparse, to hold the 2 GiB data area
# that needs.  Then:
#   - cbt-filterd refuses it as made for another image, and
#     `cbt bitmap check --image` exits 4, both before loading a bit;
#   - `cbt bitmap info`, `dump` and `check` read it (it is a valid file)
#     without reading its holes;
# each with a maximum RSS far below the 2 GiB the bits would take if they
# were loaded, and within a timeout (a hang guard, not a speed check).

source "$(dirname "$0")/functions.sh"
requires timeout truncate jq
[ -x /usr/bin/time ] || skip "/usr/bin/time is not installed"
[ -x "$CBT_CLI" ] || die "cbt CLI $CBT_CLI not found (build it: ninja -C build)"

# Far below the 2 GiB of bits, far above what the tools need (~10 MB,
# ~20 MB under ASan; meson's MALLOC_PERTURB_ changes nothing, the bits
# are mapped, not allocated).
max_rss_kb=$((200 * 1024))
huge=$((1 << 50))

disk=$tmp/disk.img
bm=$tmp/huge.bm
truncate -s 64M "$disk"
cbt bitmap create "$bm" --image "$disk" >/dev/null

# claim FILE SIZE: rewrite both metadata copies of FILE (one entry) for an
# image of SIZE bytes, with the data_length and data checksum an all-zero
# area of that size has, and extend FILE (sparse) to hold the area.
claim()
{
    "$PYTHON" - "$1" "$2" <<'PYEOF'
import struct, sys

table = []
for i in range(256):
    c = i
    for _ in range(8):
        c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)

def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF

path, size = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    meta = bytearray(f.read(24576))
    end = 0
    for slot in (0, 1):
        h = slot * 4096
        cap = struct.unpack_from("<I", meta, h + 104)[0]
        d = struct.unpack_from("<Q", meta, h + 96)[0]
        gran = struct.unpack_from("<I", meta, d + 68)[0]
        length = ((size + gran - 1) // gran + 63) // 64 * 8
        pages = (length + 4095) // 4096
        last = length - (pages - 1) * 4096
        page_crcs = (struct.pack("<I", crc32c(bytes(4096))) * (pages - 1) +
                     struct.pack("<I", crc32c(bytes(last))))
        struct.pack_into("<Q", meta, d + 80, length)                 # data_length
        struct.pack_into("<I", meta, d + 88, crc32c(page_crcs))      # data_crc32c
        struct.pack_into("<Q", meta, h + 64, size)                   # image_size
        struct.pack_into("<I", meta, h + 112, crc32c(bytes(meta[d:d + cap * 128])))
        struct.pack_into("<I", meta, h + 16, 0)
        hsize = struct.unpack_from("<I", meta, h + 12)[0]
        struct.pack_into("<I", meta, h + 16, crc32c(bytes(meta[h:h + hsize])))
        end = max(end, struct.unpack_from("<Q", meta, d + 72)[0] + length)
    f.seek(0)
    f.write(meta)
    f.truncate(end)
PYEOF
}
claim "$bm" "$huge"
[ "$(stat -c %s "$bm")" -gt $((2 << 30)) ] || die "$bm: not extended to hold 2 GiB of bits"

# bounded WANT_RC NAME CMD...: run CMD under `timeout 60` and /usr/bin/time;
# require exit status WANT_RC and a maximum RSS below $max_rss_kb.  Its
# output (without time's line) is left in $out.
bounded()
{
    local want=$1 name=$2 rc=0 rss
    shift 2
    # -k: cbt-filterd blocks SIGTERM while it starts (then 137, not 124).
    out=$(timeout -k 5 60 /usr/bin/time -f 'maxrss-kb %M' -o "$tmp/time.out" "$@" 2>&1 \
              </dev/null) || rc=$?
    [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || die "$name: still running after 60 s"
    [ "$rc" -eq "$want" ] || { echo "$out" >&2; die "$name: exit $rc, expected $want"; }
    rss=$(awk '/^maxrss-kb/ { print $2 }' "$tmp/time.out")
    [ -n "$rss" ] || die "$name: no RSS from /usr/bin/time"
    echo "$name: exit $rc, max RSS $rss KB"
    [ "$rss" -lt "$max_rss_kb" ] ||
        die "$name: max RSS $rss KB, expected below $max_rss_kb KB (the bits were loaded)"
}

# The daemon refuses it before loading anything, and starts nothing.
bounded 1 cbt-filterd "$CBT_FILTERD" --image "$disk" --socket "$tmp/s.sock" \
    --pid-file "$tmp/pid" --bitmap "$bm"
has "$bm: does not belong to $disk: image size changed: bitmap covers $huge bytes"
[ ! -e "$tmp/pid" ] || die "cbt-filterd wrote its pid file"
bounded 1 cbt-filterd-read-only "$CBT_FILTERD" --image "$disk" --read-only \
    --socket "$tmp/s.sock" --pid-file "$tmp/pid" --bitmap "$bm"
has "image size changed"

# check --image: made for another image, exit 4.
bounded 4 "cbt bitmap check --image" "$CBT_CLI" bitmap check "$bm" --image "$disk"
has "$bm: does not belong to $disk: image size changed"

# Without an image the file is valid: read, with its holes skipped.
bounded 0 "cbt bitmap info" "$CBT_CLI" bitmap info --json "$bm"
jq -e --argjson s "$huge" '.image_size == $s and .clean and
    .bitmaps[0].dirty_bytes == 0 and .bitmaps[0].data_checksum_ok' <<<"$out" >/dev/null ||
    { echo "$out" >&2; die "cbt bitmap info: unexpected report"; }
bounded 0 "cbt bitmap dump" "$CBT_CLI" bitmap dump "$bm"
has "0 extents, 0 bytes dirty (0.00% of $huge)"
bounded 0 "cbt bitmap check" "$CBT_CLI" bitmap check "$bm"
has "$bm: ok"

# A dirty bit far out in the sparse area is found (data past holes is read).
"$PYTHON" - "$bm" <<'PYEOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(4096 + 16 + 8)            # copy 1's generation (the newest)
    g1 = struct.unpack("<Q", f.read(8))[0]
    f.seek(24)
    g0 = struct.unpack("<Q", f.read(8))[0]
    slot = 1 if g1 > g0 else 0
    f.seek(slot * 4096 + 96)
    d = struct.unpack("<Q", f.read(8))[0]
    f.seek(d + 72)
    off = struct.unpack("<Q", f.read(8))[0]
    f.seek(off + (1 << 30))          # bit 2^33: image offset 2^49
    f.write(b"\x01")
PYEOF
# The data checksum no longer matches: a clean file is then damaged.
bounded 4 "cbt bitmap check (changed data)" "$CBT_CLI" bitmap check "$bm"
has "data checksum mismatch"

echo "ok"
