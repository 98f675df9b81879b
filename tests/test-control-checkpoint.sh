#!/usr/bin/env bash
# Control socket and checkpoints: status, checkpoint-begin moves the dirty
# bits into a frozen bitmap exported as a second meta context, writes during
# the checkpoint go to the new active bitmap, commit drops the frozen one,
# abort merges it back, a clean restart keeps a checkpoint in progress, a
# crash makes both untrusted, a begin racing with writes loses none, and
# malformed requests get errors without hurting the daemon.

source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img nbdinfo jq
requires_python_nbd

disk=$tmp/disk.img
bm=$tmp/disk.bitmap
csock=$tmp/ctl.sock
truncate -s 128M "$disk"

expect_map()
{
    local got
    got=$(dirty_map "$1")
    [ "$got" = "$2" ] || die "$1: expected dirty [$2], got [$got]"
}
# req JSON: one request, reply on stdout, must not be an error.
req()
{
    local r
    r=$(ctl "$csock" "$1")
    jq -e 'has("return")' <<<"$r" >/dev/null || die "request $1 failed: $r"
    printf '%s\n' "$r"
}
req_error()
{
    local r
    r=$(ctl "$csock" "$1")
    [ "$(jq -r '.error.class' <<<"$r")" = "$2" ] ||
        die "request $1: expected error $2, got $r"
}

start_filterd --image "$disk" --bitmap "$bm" --tracking lazy --control "$csock"
st=$(req '{"execute":"status","id":"x1"}')
[ "$(jq -r .id <<<"$st")" = x1 ] || die "id not echoed: $st"
jq -e '.return.bitmap.trusted == true and .return.checkpoint == null and
       .return.size == 134217728 and .return.bitmap.granularity == 65536' \
    <<<"$st" >/dev/null || die "unexpected status: $st"

qio -f raw "$uri" -c 'write -P 1 0 4k' -c 'write -P 2 1M 100k'
st=$(req '{"execute":"checkpoint-begin"}')
id1=$(jq -r .return.checkpoint.checkpoint <<<"$st")
jq -e '.return.checkpoint.trusted and .return.checkpoint.previous == null and
       .return.checkpoint."dirty-bytes" == 196608 and
       .return.bitmap."dirty-bytes" == 0' <<<"$st" >/dev/null ||
    die "unexpected status after begin: $st"
req_error '{"execute":"checkpoint-begin"}' CheckpointInProgress

# Writes during the checkpoint land in the active bitmap only.
qio -f raw "$uri" -c 'write -P 3 4M 64k' -c 'write -z 8M 1k'
expect_map qemu:dirty-bitmap:cbt-checkpoint "0 65536
1048576 131072"
expect_map qemu:dirty-bitmap:cbt "4194304 65536
8388608 65536"
# Existing tools read it the QEMU way too.
qemu-img map --output=json --image-opts \
    "driver=nbd,server.type=unix,server.path=$sock,x-dirty-bitmap=qemu:dirty-bitmap:cbt-checkpoint" |
    jq -e '[.[] | select(.data == false)] | map(.start) == [0, 1048576]' >/dev/null ||
    die "qemu-img map with x-dirty-bitmap disagrees"

req_error '{"execute":"checkpoint-commit","arguments":{"checkpoint":"0000000000000001"}}' CheckpointMismatch
req_error '{"execute":"checkpoint-commit"}' BadRequest
req "{\"execute\":\"checkpoint-commit\",\"arguments\":{\"checkpoint\":\"$id1\"}}" >/dev/null
nbdinfo --map=qemu:dirty-bitmap:cbt-checkpoint "$uri" >/dev/null 2>&1 &&
    die "frozen context still offered after commit"
req_error '{"execute":"checkpoint-commit","arguments":{"checkpoint":"0000000000000001"}}' NoCheckpoint

# Abort: bits and the previous checkpoint id come back.
st=$(req '{"execute":"checkpoint-begin"}')
[ "$(jq -r .return.checkpoint.previous <<<"$st")" = "$id1" ] || die "previous id: $st"
qio -f raw "$uri" -c 'discard 16M 64k'
st=$(req '{"execute":"checkpoint-abort"}')
jq -e --arg id "$id1" '.return.checkpoint == null and .return.bitmap.checkpoint == $id' \
    <<<"$st" >/dev/null || die "abort did not restore the interval: $st"
expect_map qemu:dirty-bitmap:cbt "4194304 65536
8388608 65536
16777216 65536"

# A clean restart keeps a checkpoint in progress (and its bits).
st=$(req '{"execute":"checkpoint-begin"}')
id2=$(jq -r .return.checkpoint.checkpoint <<<"$st")
stop_filterd
start_filterd --image "$disk" --bitmap "$bm" --tracking lazy --control "$csock"
st=$(req '{"execute":"status"}')
jq -e --arg id "$id2" '.return.checkpoint.checkpoint == $id and .return.checkpoint.trusted
    and .return.bitmap.trusted' <<<"$st" >/dev/null || die "checkpoint lost by restart: $st"
expect_map qemu:dirty-bitmap:cbt-checkpoint "4194304 65536
8388608 65536
16777216 65536"

# A crash makes everything untrusted: both bitmaps report all dirty.
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
start_filterd --image "$disk" --bitmap "$bm" --tracking lazy --control "$csock"
grep -q "not shut down cleanly" "$log" || die "no warning about the unclean bitmap"
st=$(req '{"execute":"status"}')
jq -e '.return.bitmap.trusted == false and .return.bitmap."clean-at-start" == false and
       .return.checkpoint.trusted == false' <<<"$st" >/dev/null || die "crash not detected: $st"
expect_map qemu:dirty-bitmap:cbt "0 134217728"
expect_map qemu:dirty-bitmap:cbt-checkpoint "0 134217728"
# Aborting keeps it untrusted; a new checkpoint starts a trusted interval
# whose frozen half (everything before) is untrusted.
st=$(req '{"execute":"checkpoint-abort"}')
jq -e '.return.bitmap.trusted == false' <<<"$st" >/dev/null || die "abort made it trusted: $st"
st=$(req '{"execute":"checkpoint-begin"}')
jq -e '.return.bitmap.trusted == true and .return.checkpoint.trusted == false' \
    <<<"$st" >/dev/null || die "unexpected status after begin on untrusted: $st"
id3=$(jq -r .return.checkpoint.checkpoint <<<"$st")
req "{\"execute\":\"checkpoint-commit\",\"arguments\":{\"checkpoint\":\"$id3\"}}" >/dev/null
expect_map qemu:dirty-bitmap:cbt ""

# Malformed requests: an error each, the connection and daemon carry on.
out=$(ctl "$csock" 'not json' '[1,2]' '{"execute":42}' '{"execute":"frobnicate"}' \
      '{"execute":"status","arguments":[]}' \
      '{"execute":"checkpoint-commit","arguments":{"checkpoint":"xyz"}}' \
      '{"execute":"status"}')
[ "$(jq -r '.error.class // "ok"' <<<"$out" | tr '\n' ' ')" = \
  "BadRequest BadRequest BadRequest BadRequest BadRequest BadRequest ok " ] ||
    die "malformed requests: $out"
"$PYTHON" - "$csock" <<'PYEOF' || die "over-long line not refused"
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(10)
try:
    s.sendall(b"x" * (70 * 1024))
except OSError:
    pass
data = b""
while True:
    try:
        c = s.recv(4096)
    except OSError:
        break
    if not c:
        break
    data += c
assert b"BadRequest" in data, data
PYEOF
req '{"execute":"status"}' >/dev/null

# No write is lost when a checkpoint begins while writes are in flight.
"$PYTHON" "$testsdir/nbd-checkpoint-race.py" "$sock" "$csock"
stop_filterd

# Without --bitmap there is nothing to checkpoint.
start_filterd --image "$disk" --control "$csock"
req_error '{"execute":"checkpoint-begin"}' NoBitmap
jq -e '.return.bitmap == null' <<<"$(req '{"execute":"status"}')" >/dev/null
stop_filterd
