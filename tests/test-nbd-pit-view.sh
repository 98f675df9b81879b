#!/usr/bin/env bash
# The point-in-time view (NAME@checkpoint) driven by real clients:
#   - fio rewrites the disk at random (two jobs, deep queues) and qemu-io
#     zeroes and trims while a libnbd reader takes the view over four
#     connections in random order and TRIMs what it has read: every byte
#     is the disk at checkpoint-begin (reads race copies, TRIMs race
#     copies, multi-conn on both exports);
#   - an incremental view protects only the frozen bitmap's granules and
#     copies a granule written twice once; its base:allocation is the one
#     at checkpoint-begin even after the guest filled holes;
#   - commit while the view is being read: the reader gets errors, the
#     daemon serves on, nothing is left;
#   - wrong uses: no view -> no export; writes to the view -> EPERM; a bad
#     point-in-time argument; a scratch directory that does not exist; a
#     too small --scratch-limit.

source "$(dirname "$0")/functions.sh"
requires qemu-io nbdinfo nbdcopy fio jq cmp
requires_python_nbd
fio --enghelp=nbd >/dev/null 2>&1 || skip "fio has no nbd engine"

size=$((128 * 1024 * 1024))
disk=$tmp/disk.img
bm=$tmp/disk.bitmap
csock=$tmp/ctl.sock
reader=$CBT_SOURCE_DIR/tests/nbd-pit-reader.py
head -c $((96 * 1024 * 1024)) /dev/urandom >"$disk"
truncate -s "$size" "$disk"

req()
{
    local r
    r=$(ctl "$csock" "$1")
    json_true 'has("return")' "$r" || die "request $1 failed: $r"
    printf '%s\n' "$r"
}
cp_id() { ctl "$csock" '{"execute":"status"}' | jq -r .return.checkpoint.checkpoint; }
commit() { req "{\"execute\":\"checkpoint-commit\",\"arguments\":{\"checkpoint\":\"$(cp_id)\"}}" >/dev/null; }
view_uri() { printf 'nbd+unix:///@checkpoint?socket=%s' "$sock"; }

start_filterd --image "$disk" --bitmap "$bm" --control "$csock"

# No checkpoint, no view.
nbdinfo "$(view_uri)" >/dev/null 2>&1 && die "the view exists without a checkpoint"
nbdinfo --list "$uri" | grep -q '@checkpoint' && die "LIST shows a view without a checkpoint"

# --- 1. full view under random writes, zeroes and trims -------------------
req '{"execute":"checkpoint-begin","arguments":{"point-in-time":"full"}}' >/dev/null
cp "$disk" "$tmp/at-begin.raw"
nbdinfo --list "$uri" | grep -q 'export="@checkpoint"' || die "LIST does not show the view"
cat >"$tmp/job.fio" <<'JOB'
[global]
rw=randwrite
bssplit=4k/50:64k/30:1m/20
iodepth=16
runtime=6
time_based=1
size=128m
[w1]
[w2]
JOB
(cd "$tmp" && fio --ioengine=nbd --uri="$uri" "$tmp/job.fio" >"$tmp/fio.out" 2>&1) &
fio_pid=$!
(for i in $(seq 0 15); do
     qio -f raw "$uri" -c "write -z $((i * 8))M 1M" -c "discard $((i * 8 + 4))M 1M"
 done) &
q_pid=$!
"$PYTHON" "$reader" "$sock" @checkpoint "$tmp/at-begin.raw" 4 --release ||
    die "the full view is not the disk at checkpoint-begin"
wait "$q_pid" || die "guest zeroes/trims failed during the view"
wait "$fio_pid" || { cat "$tmp/fio.out"; die "guest writes failed during the view"; }
v=$(view_status "$csock")
json_true '."copied-bytes" > 0 and ."released-bytes" > 0 and .failed == null and
           ."scratch-bytes" <= ."scratch-peak"' "$v" ||
    die "unexpected view status: $v"
commit
[ "$(view_status "$csock")" = null ] || die "view still open after commit"
nbdinfo "$(view_uri)" >/dev/null 2>&1 && die "the view outlived its checkpoint"
[ "$(scratch_files_of "$pid")" -eq 0 ] || die "scratch file held after commit"

# --- 2. incremental view: only frozen granules, each copied once ----------
# A checkpoint without a view first, so that the active bitmap holds only
# the three writes below.
req '{"execute":"checkpoint-begin"}' >/dev/null
json_true '.return.checkpoint."point-in-time" == null' "$(req '{"execute":"status"}')" ||
    die "a begin without point-in-time opened a view"
commit
qio -f raw "$uri" -c "write -P 1 0 64k" -c "write -P 2 1M 128k" -c "write -P 3 100M 64k"
req '{"execute":"checkpoint-begin","arguments":{"point-in-time":"incremental"}}' >/dev/null
cp "$disk" "$tmp/at-begin.raw"
nbdinfo --map "$(view_uri)" >"$tmp/map-before"
qio -f raw "$uri" -c "write -P 9 8M 64k" -c "write -P 9 110M 1M"   # clean granules
json_true '."copies" == 0' "$(view_status "$csock")" ||
    die "writes to clean granules were copied: $(view_status "$csock")"
qio -f raw "$uri" -c "write -P 7 0 4k" -c "write -P 8 4k 4k" -c "write -P 6 100M 4k"
json_true '."copies" == 2 and ."copied-bytes" == 131072' "$(view_status "$csock")" ||
    die "a granule written twice was not copied exactly once: $(view_status "$csock")"
nbdinfo --map "$(view_uri)" >"$tmp/map-after"
cmp "$tmp/map-before" "$tmp/map-after" ||
    die "base:allocation of the view changed when the guest filled a hole"
nbdinfo --map=qemu:dirty-bitmap:cbt-checkpoint "$(view_uri)" | grep -q . ||
    die "the view does not offer the frozen bitmap"
# The granules an incremental reads are the checkpoint's (the clean ones
# read as the live disk: nobody needs them).
nbdcopy "$(view_uri)" "$tmp/view.raw"
for r in 0:65536 1048576:131072 104857600:65536; do
    cmp -i "${r%:*}" -n "${r#*:}" "$tmp/at-begin.raw" "$tmp/view.raw" ||
        die "the incremental view differs in its dirty range $r"
done
# Writes to the view are refused.
"$PYTHON" - "$sock" <<'PYEOF' || die "a write to the view was not refused with EPERM"
import errno, sys, nbd
h = nbd.NBD(); h.set_export_name("@checkpoint"); h.connect_unix(sys.argv[1])
try:
    h.pwrite(b"x" * 512, 0)
except nbd.Error as e:
    sys.exit(0 if e.errnum == errno.EPERM else 1)
sys.exit(1)
PYEOF
commit

# --- 3. commit while the view is read --------------------------------------
req '{"execute":"checkpoint-begin","arguments":{"point-in-time":"full"}}' >/dev/null
cp "$disk" "$tmp/at-begin.raw"
(cd "$tmp" && fio --ioengine=nbd --uri="$uri" --runtime=3 "$tmp/job.fio" >"$tmp/fio.out" 2>&1) &
fio_pid=$!
"$PYTHON" "$reader" "$sock" @checkpoint "$tmp/at-begin.raw" 4 >"$tmp/reader.out" 2>&1 &
r_pid=$!
sleep 0.1
commit
# The reader finished first, or its reads (or its connecting, if the commit
# came first) failed with ESHUTDOWN / no such export; never other data.
wait "$r_pid" || grep -q -e "ESHUTDOWN" -e "opt_go" -e "no export named" "$tmp/reader.out" ||
    { cat "$tmp/reader.out"; die "reads cut by commit failed with something else"; }
grep -q "differs" "$tmp/reader.out" && die "$(cat "$tmp/reader.out")"
wait "$fio_pid" || { cat "$tmp/fio.out"; die "guest writes failed around a commit"; }
nbdinfo "$uri" >/dev/null || die "the daemon stopped serving"
[ "$(scratch_files_of "$pid")" -eq 0 ] || die "scratch file held after commit"

# --- 4. wrong uses --------------------------------------------------------
r=$(ctl "$csock" '{"execute":"checkpoint-begin","arguments":{"point-in-time":"yes"}}')
[ "$(jq -r .error.class <<<"$r")" = BadRequest ] || die "bad point-in-time accepted: $r"
stop_filterd

start_filterd --image "$disk" --bitmap "$bm" --control "$csock" --scratch "$tmp/nowhere"
r=$(ctl "$csock" '{"execute":"checkpoint-begin","arguments":{"point-in-time":"full"}}')
json_true '.error.desc | test("nowhere")' "$r" || die "missing scratch dir: $r"
json_true '.return.checkpoint == null' "$(ctl "$csock" '{"execute":"status"}')" ||
    die "a failed begin left a checkpoint"
stop_filterd
expect_rc 2 "$CBT_FILTERD" --image "$disk" --socket "$tmp/x.sock" --bitmap "$bm" \
    --scratch-limit 10
has "scratch-limit"
echo "point-in-time view: races, incremental, commit under reads, wrong uses OK"
