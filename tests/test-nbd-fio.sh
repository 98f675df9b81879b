#!/usr/bin/env bash
# Concurrent random writes from fio's nbd engine: two jobs, so two
# connections, 16 requests in flight each, mixed sizes, with FLUSH every
# 16 writes.  fio verifies every block (crc32c) through NBD, then again by
# reading the raw file directly after the daemon stopped.
#
# CBT_TEST_CACHE=none runs it with --cache none (test-nbd-cache-none.sh).

source "$(dirname "$0")/functions.sh"
requires fio
fio --enghelp=nbd >/dev/null 2>&1 || skip "fio has no nbd engine"

disk=$tmp/disk.img
truncate -s 64M "$disk"

# Each job writes its own 24 MiB at a 32 MiB stride, so blocks never
# overlap between jobs; the same job file replays the same offsets and
# seeds for the verify-only pass.
cat >"$tmp/job.fio" <<'JOB'
[global]
rw=randwrite
bsrange=512-64k
blockalign=512
iodepth=16
size=24M
offset_increment=32M
numjobs=2
fsync=16
verify=crc32c
verify_fatal=1
verify_state_save=0
do_verify=1
loops=1
[w]
JOB

start_filterd --image "$disk" ${CBT_TEST_CACHE:+--cache "$CBT_TEST_CACHE"}
cd "$tmp"     # fio may drop state files in the working directory
fio --ioengine=nbd --uri="$uri" "$tmp/job.fio" >"$tmp/fio.out" 2>&1 ||
    { cat "$tmp/fio.out"; die "fio write+verify through NBD failed"; }
stop_filterd

fio --ioengine=psync --filename="$disk" --verify_only "$tmp/job.fio" \
    >"$tmp/fio-file.out" 2>&1 ||
    { cat "$tmp/fio-file.out"; die "fio verify of the raw file failed"; }

# The workload really landed in the file (not all zeroes).
[ "$(stat -c %b "$disk")" -gt 0 ] || die "raw file has no blocks allocated"
