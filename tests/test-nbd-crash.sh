#!/usr/bin/env bash
# kill -9 in the middle of a write workload: every write the daemon
# acknowledged is in the image afterwards, the bitmap (--tracking lazy) is
# reported not clean and untrusted after the restart (all dirty over NBD), and the restarted
# daemon serves the same bytes.  Repeated with --cache none.

source "$(dirname "$0")/functions.sh"
requires nbdinfo nbdcopy jq cmp
requires_python_nbd

bs=4096
for cache in writeback none; do
    disk=$tmp/disk-$cache.img
    bm=$tmp/disk-$cache.bitmap
    truncate -s 16M "$disk"
    start_filterd --image "$disk" --bitmap "$bm" --tracking lazy --cache "$cache"
    "$PYTHON" "$testsdir/nbd-shutdown-writer.py" "$uri" "$pid" "$tmp/acked" 200 $bs KILL \
        >"$tmp/writer.out" || die "writer failed: $(cat "$tmp/writer.out")"
    wait "$pid" 2>/dev/null || true
    cat "$tmp/writer.out"
    nacked=$(wc -l <"$tmp/acked")
    [ "$nacked" -ge 200 ] || die "only $nacked writes acknowledged"

    "$PYTHON" "$testsdir/nbd-shutdown-writer.py" --verify "$disk" "$tmp/acked" $bs ||
        die "acknowledged writes missing after kill -9 ($cache)"

    # The stale socket from the killed daemon is replaced.
    cp "$disk" "$tmp/after-crash.img"
    start_filterd --image "$disk" --bitmap "$bm" --tracking lazy --socket "$sock"
    grep -q "not shut down cleanly" "$log" || die "restart did not report the unclean bitmap"
    size=$(stat -c %s "$disk")
    got=$(nbdinfo --map=qemu:dirty-bitmap:cbt --json "$uri" |
          jq -r 'map(select(.type == 1) | .length) | add')
    [ "$got" = "$size" ] || die "untrusted bitmap should report all $size bytes dirty, got $got"
    nbdcopy "$uri" "$tmp/served.img"
    cmp "$tmp/served.img" "$tmp/after-crash.img" || die "restarted daemon serves other bytes"
    stop_filterd
    if [ -x "${CBT_CLI:-$CBT_BUILD_DIR/cbt/cbt}" ]; then
        "${CBT_CLI:-$CBT_BUILD_DIR/cbt/cbt}" bitmap info --json "$bm" |
            jq -e '.clean == true and .bitmaps[0].inconsistent == true and
                   .bitmaps[0].trusted == false' >/dev/null ||
            die "bitmap should be clean but inconsistent after a crash and a clean stop"
    fi
    rm -f "$tmp/acked"
done

# A supervisor restarting at once after kill -9 must get the same socket
# paths back, although the dead daemon's listeners linger for a moment.
for i in 1 2 3; do
    start_filterd --image "$tmp/disk-none.img" --socket "$tmp/s.sock" --control "$tmp/c.sock"
    kill -9 "$pid"
    wait "$pid" 2>/dev/null || true
done
start_filterd --image "$tmp/disk-none.img" --socket "$tmp/s.sock" --control "$tmp/c.sock"
stop_filterd
