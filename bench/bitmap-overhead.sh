#!/usr/bin/env bash
# The cost of dirty tracking: fio 4k random writes (QD32 and QD1) and 4k
# random reads against cbt-filterd without and with --bitmap, on one image,
# the two alternating run by run (bench/fio-compare.sh does the work).
#
# Environment: ROUNDS [5], RUNTIME [10], plus everything fio-compare.sh
# takes.  Prints the table; the ratio column to read is cbt-bitmap/cbt.
set -euo pipefail
cd "$(dirname "$0")/.."
export ROUNDS=${ROUNDS:-5}
export SERVERS="cbt cbt-bitmap"
export WORKLOADS=${WORKLOADS:-"randwrite4k-qd32 randwrite4k-qd1 randread4k-qd32"}
exec bash bench/fio-compare.sh "$@"
