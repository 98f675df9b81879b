#!/usr/bin/env bash
# The cost of dirty tracking: fio 4k random writes against cbt-filterd
# without a bitmap (cbt), with lazy tracking (cbt-lazy) and with crash-safe
# tracking (cbt-bitmap, the default), on one image, alternating run by run
# (bench/fio-compare.sh does the work).  firstwrite4k-* writes 4 KiB into
# each 64 KiB granule once, in order, so every write of a crash-safe run waits for a commit
# (shared with the others in flight); randwrite4k-* runs 10 s of random
# writes, mostly to granules already durable.
#
# Environment: ROUNDS [5], RUNTIME [10], plus everything fio-compare.sh
# takes.  Prints the table; the ratio columns to read are cbt-bitmap/cbt
# and cbt-lazy/cbt.
set -euo pipefail
cd "$(dirname "$0")/.."
export ROUNDS=${ROUNDS:-5}
export SERVERS="cbt cbt-lazy cbt-bitmap"
export WORKLOADS=${WORKLOADS:-"firstwrite4k-qd32 firstwrite4k-qd1 randwrite4k-qd32 randwrite4k-qd1"}
exec bash bench/fio-compare.sh "$@"
