#!/usr/bin/env bash
# A FIFO where a file is expected is refused at once, by name, never
# waited on (opening a FIFO for reading blocks until a writer comes, and
# none ever does here): the image of cbt-filterd with --format auto, raw or
# qcow2, read-write or --read-only; the backing file of a qcow2 image (raw,
# qcow2 or unnamed format); the bitmap file; the manifest of a repository
# (cbt list, verify, restore, backup) and a backup file it lists.  Each
# command runs under `timeout 20`: a hang (124, or 137 after -k) fails
# the test.

source "$(dirname "$0")/functions.sh"
requires qemu-img qemu-io jq timeout mkfifo

fifo=$tmp/fifo
mkfifo "$fifo"
disk=$tmp/disk.img
truncate -s 16M "$disk"

# refused WANT_RC TEXT CMD...: CMD must exit WANT_RC within 20 s and print
# TEXT.
refused()
{
    local want=$1 text=$2 rc=0
    shift 2
    # -k: cbt-filterd blocks SIGTERM while it starts (then 137, not 124).
    out=$(timeout -k 5 20 "$@" 2>&1 </dev/null) || rc=$?
    [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || die "$*: hangs (timeout)"
    [ "$rc" -eq "$want" ] || { echo "$out" >&2; die "$*: exit $rc, expected $want"; }
    has "$text"
}

daemon=("$CBT_FILTERD" --socket "$tmp/s.sock" --pid-file "$tmp/pid")

# The image.
for fmt in auto raw qcow2; do
    refused 1 "$fifo: a FIFO, not a regular file" "${daemon[@]}" --image "$fifo" --format "$fmt"
    refused 1 "$fifo: a FIFO, not a regular file" \
        "${daemon[@]}" --image "$fifo" --format "$fmt" --read-only
done
refused 1 "$fifo: a FIFO, not a regular file" "$CBT_CLI" bitmap create "$tmp/x.bm" --image "$fifo"
refused 1 "$fifo: a FIFO, not a regular file" \
    "$CBT_CLI" bitmap check "$tmp/none.bm" --image "$fifo"

# The backing file of a qcow2 image (-u: qemu-img must not open it either).
for bfmt in raw qcow2 ""; do
    top=$tmp/top-${bfmt:-auto}.qcow2
    qemu-img create -q -f qcow2 -u -b "$fifo" -F "${bfmt:-raw}" "$top" 16M
    if [ -z "$bfmt" ]; then
        # No backing format: end the header extensions at the first one,
        # the backing format (qemu-img no longer writes such images).
        "$PYTHON" - "$top" <<'PYEOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(100)
    hl = struct.unpack(">I", f.read(4))[0]
    f.seek(hl)
    assert struct.unpack(">I", f.read(4))[0] == 0xe2792aca, "no backing format extension"
    f.seek(hl)
    f.write(b"\0" * 4)
PYEOF
    fi
    for ro in "" --read-only; do
        refused 1 "$top: backing file: $fifo: a FIFO, not a regular file" \
            "${daemon[@]}" --image "$top" $ro
    done
done

# The bitmap file.
refused 1 "not a regular file" "${daemon[@]}" --image "$disk" --bitmap "$fifo" --read-only
refused 1 "not a regular file" "${daemon[@]}" --image "$disk" --bitmap "$fifo"
refused 1 "not a regular file" "$CBT_CLI" bitmap info "$fifo"

# A repository with one backup, then its manifest or the backup a FIFO.
start_filterd --image "$disk" --bitmap "$tmp/disk.bm" --control "$tmp/ctl.sock"
qio -f raw "$uri" -c 'write -P 0x11 0 1M'
cbt backup --socket "$sock" --control "$tmp/ctl.sock" --repo "$tmp/repo" >/dev/null 2>&1 ||
    die "cbt backup failed"
file=$(jq -r '.backups[0].file' "$tmp/repo/manifest.json")

cp -a "$tmp/repo" "$tmp/repo-m"
rm "$tmp/repo-m/manifest.json"
mkfifo "$tmp/repo-m/manifest.json"
m=$tmp/repo-m/manifest.json
refused 4 "$m: a FIFO, not a regular file" "$CBT_CLI" list --repo "$tmp/repo-m"
refused 4 "$m: a FIFO, not a regular file" "$CBT_CLI" verify --repo "$tmp/repo-m"
refused 4 "$m: a FIFO, not a regular file" \
    "$CBT_CLI" restore --repo "$tmp/repo-m" --output "$tmp/r.raw"
refused 4 "$m: a FIFO, not a regular file" \
    "$CBT_CLI" backup --socket "$sock" --control "$tmp/ctl.sock" --repo "$tmp/repo-m"

cp -a "$tmp/repo" "$tmp/repo-f"
rm "$tmp/repo-f/$file"
mkfifo "$tmp/repo-f/$file"
refused 4 "$tmp/repo-f/$file" "$CBT_CLI" verify --repo "$tmp/repo-f"
refused 4 "$tmp/repo-f/$file: not a regular file" \
    "$CBT_CLI" restore --repo "$tmp/repo-f" --output "$tmp/r.raw"

# The daemon took no harm from the refused backup.
[ "$(ctl "$tmp/ctl.sock" '{"execute":"status"}' | jq -r '.return.checkpoint')" = null ] ||
    die "a checkpoint was left open by the refused backup"
stop_filterd
echo ok
