#!/usr/bin/env bash
# No client input can crash or stall the daemon: hundreds of connections of
# seeded random garbage (negotiation and transmission), then a normal
# client is served, and SIGTERM still exits 0.  Under the sanitizer build
# this doubles as a small fuzz run of the request and option parsers.

source "$(dirname "$0")/functions.sh"
requires qemu-io timeout jq
requires_python_nbd

disk=$tmp/disk.img
truncate -s 64M "$disk"
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --handshake-timeout 2 \
    --control "$tmp/ctl"
seed=${CBT_GARBAGE_SEED:-20261122}
timeout 300 "$PYTHON" "$testsdir/nbd-garbage.py" "$sock" "$seed" 300 ||
    die "garbage client failed (seed $seed)"
kill -0 "$pid" 2>/dev/null || die "daemon died on garbage (seed $seed)"
# Complete requests the garbage clients sent before hanging up may still
# run (a connection waiting for memory, --max-memory, parses them later);
# NBD orders nothing across connections, so the check waits for them.
for (( i = 0; i < 600; i++ )); do
    [ "$(ctl "$tmp/ctl" '{"execute":"status"}' | jq -r .return.clients)" = 0 ] && break
    sleep 0.1
done
qio -f raw "$uri" -c 'write -P 9 1M 64k' -c 'read -P 9 1M 64k'
stop_filterd
