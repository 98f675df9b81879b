#!/usr/bin/env bash
# Compare cbt-filterd with other NBD servers under fio's nbd engine.
#
# One 2 GiB raw image, created once and fully written (not sparse), is
# served in turn by each server on a unix socket in a private temp
# directory; fio (--ioengine=nbd, one connection) runs each workload
# against it.  Servers:
#
#   cbt            build/filterd/cbt-filterd (--cache writeback, default)
#   qemu-nbd       qemu-nbd -f raw --aio=io_uring --cache=writeback
#   nbdkit-file    nbdkit file (default threads)
#   nbdkit-null    nbdkit null 2G: no storage at all, the protocol ceiling
#   cbt-none, qemu-nbd-none   the same with --cache none (CACHE_NONE=1)
#   cbt-bitmap     cbt with dirty tracking on (--bitmap, a fresh file per
#                  run; crash-safe tracking, the default): the cost of
#                  tracking (bench/bitmap-overhead.sh)
#   cbt-lazy       the same with --tracking lazy
#   cbt-bitmap-warm  cbt-bitmap whose every granule was written once before
#                  the measured run (4 KiB into each 64 KiB granule): the
#                  steady state, where no write waits for a commit
#   When both cbt-bitmap and cbt-bitmap-warm run (the default), cbt-bitmap
#   runs only the firstwrite workloads (which warming would void) and
#   cbt-bitmap-warm only the others.
#   cbt-base-warm  cbt-bitmap-warm run by the binary CBT_FILTERD_BASE (an
#                  older build: before/after in one run)
#   cbt-qcow2, qemu-nbd-qcow2   both on a qcow2 copy of the image (64 KiB
#                  clusters, fully allocated by qemu-img convert), made
#                  once when one of them is asked for
#
# Fairness: each server is started fresh for every run; within a round the
# servers take turns, the starting server rotating from round to round, so
# a slow drift of the machine (page cache, thermal, a neighbour) spreads
# over all of them.  Each combination runs ROUNDS times and the median is
# reported.  The image is synced before every measured run (after the
# warm-up, if any), so no run pays for the writeback of an earlier one.
#
# With the writeback cache the 2 GiB image sits in the page cache after it
# is written, so reads measure the server and the protocol, not the disk.
# fio and the server share the machine's cores.
#
# Builds nothing: build cbt-filterd first (ninja -C build).
#
# Environment (defaults in brackets):
#   ROUNDS [3]        runs per server and workload; the median is reported
#   RUNTIME [10]      seconds per fio run (time based)
#   RAMP [1]          fio ramp_time seconds, not measured
#   CACHE_NONE [0]    1: also run cbt-none and qemu-nbd-none
#   SERVERS           servers to run, e.g. "cbt qemu-nbd" [cbt-bitmap-warm
#                     cbt-bitmap nbdkit-file qemu-nbd nbdkit-null]
#   WORKLOADS         e.g. "randread4k-qd32" [randwrite4k-qd1
#                     randwrite4k-qd32 randread4k-qd1 randread4k-qd32
#                     seqread64k-qd32 firstwrite4k-qd1 firstwrite4k-qd32]
#   CBT_FILTERD       daemon binary [build/filterd/cbt-filterd]
#   CBT_FILTERD_BASE  the binary of cbt-base-warm (which is only run if set
#                     and named in SERVERS)
#   OUT               JSON result file
#                     [${TMPDIR:-/tmp}/cbt-fio-compare-DATE.json]
#   TMPDIR            where the private directory with the image goes
#
# The last table holds the ratios issue 11 sets targets for: cbt with a
# crash-safe bitmap (steady state: cbt-bitmap-warm; first writes on a fresh
# bitmap: cbt-bitmap) against nbdkit file, qemu-nbd, and nbdkit null (the
# most this fio client can drive over one connection).

set -euo pipefail

cd "$(dirname "$0")/.."
src=$PWD

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-1}
filterd=${CBT_FILTERD:-$src/build/filterd/cbt-filterd}
filterd_base=${CBT_FILTERD_BASE:-}
stamp=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-${TMPDIR:-/tmp}/cbt-fio-compare-$stamp.json}
size_bytes=$((2 * 1024 * 1024 * 1024))

default_servers="cbt-bitmap-warm cbt-bitmap nbdkit-file qemu-nbd nbdkit-null"
[[ ${CACHE_NONE:-0} == 1 ]] && default_servers="cbt cbt-none qemu-nbd qemu-nbd-none nbdkit-file nbdkit-null"
read -r -a servers <<<"${SERVERS:-$default_servers}"
read -r -a workloads <<<"${WORKLOADS:-randwrite4k-qd1 randwrite4k-qd32 randread4k-qd1 randread4k-qd32 seqread64k-qd32 firstwrite4k-qd1 firstwrite4k-qd32}"

die() { echo "fio-compare: $*" >&2; exit 1; }

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS=$ROUNDS: not a positive number"
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RUNTIME=$RUNTIME: not a positive number"
for tool in fio qemu-nbd nbdkit python3; do
    command -v "$tool" >/dev/null || die "$tool not found (bash tests/install-deps.sh)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"
for s in "${servers[@]}"; do
    case $s in
    cbt|cbt-none|cbt-bitmap|cbt-bitmap-warm|cbt-lazy|cbt-qcow2) [[ -x $filterd ]] || die "$filterd not built (ninja -C build)" ;;
    cbt-base-warm) [[ -n $filterd_base && -x $filterd_base ]] || die "cbt-base-warm needs CBT_FILTERD_BASE" ;;
    qemu-nbd|qemu-nbd-none|qemu-nbd-qcow2|nbdkit-file|nbdkit-null) ;;
    *) die "unknown server '$s'" ;;
    esac
done

# workload NAME: the fio arguments for it.
workload_args() {
    case $1 in
    randread4k-qd32)  echo "--rw=randread  --bs=4k  --iodepth=32" ;;
    randwrite4k-qd32) echo "--rw=randwrite --bs=4k  --iodepth=32" ;;
    seqread64k-qd32)  echo "--rw=read      --bs=64k --iodepth=32" ;;
    randread4k-qd1)   echo "--rw=randread  --bs=4k  --iodepth=1" ;;
    randwrite4k-qd1)  echo "--rw=randwrite --bs=4k  --iodepth=1" ;;
    # Every write to a 64 KiB granule not written before (a fresh bitmap
    # per run): 4 KiB at the start of each granule in turn (fio's strided
    # zones), 32768 writes each the first of its granule -- what a
    # crash-safe commit costs at most.
    firstwrite4k-qd32) echo "--rw=write --bs=4k --zonemode=strided --zonesize=4k --zonerange=64k --iodepth=32 --io_size=128m" ;;
    firstwrite4k-qd1)  echo "--rw=write --bs=4k --zonemode=strided --zonesize=4k --zonerange=64k --iodepth=1 --io_size=128m" ;;
    *) return 1 ;;
    esac
}
for w in "${workloads[@]}"; do
    workload_args "$w" >/dev/null || die "unknown workload '$w'"
done

# skip SERVER WORKLOAD: true if the pair is not run (see cbt-bitmap-warm).
skip() {
    [[ " ${servers[*]} " == *" cbt-bitmap "* && " ${servers[*]} " == *" cbt-bitmap-warm "* ]] ||
        return 1
    case $1:$2 in
    cbt-bitmap-warm:firstwrite* | cbt-base-warm:firstwrite*) return 0 ;;
    cbt-bitmap:firstwrite*) return 1 ;;
    cbt-bitmap:*) return 0 ;;
    esac
    return 1
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cbt-bench.XXXXXX")
chmod 700 "$tmp"
img=$tmp/disk.img
resdir=$tmp/results
mkdir "$resdir"

server_pid=
server_pidfile=
stop_server() {
    local pids=()
    [[ -n $server_pid ]] && pids+=("$server_pid")
    if [[ -n $server_pidfile && -s $server_pidfile ]]; then
        local p
        p=$(<"$server_pidfile")
        [[ $p =~ ^[0-9]+$ && $p != "$server_pid" ]] && pids+=("$p")
    fi
    (( ${#pids[@]} )) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "${pids[@]}" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
    [[ -n $server_pid ]] && { wait "$server_pid" 2>/dev/null || true; }
    server_pid=
    server_pidfile=
}
cleanup() {
    stop_server
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_server NAME SOCK: start it in the background, wait until it listens.
start_server() {
    local name=$1 sock=$2 log=$tmp/server.log
    server_pidfile=$tmp/server.pid
    rm -f "$sock" "$server_pidfile"
    case $name in
    cbt)
        "$filterd" --image "$img" --format raw --socket "$sock" --pid-file "$server_pidfile" \
            >"$log" 2>&1 & ;;
    cbt-none)
        "$filterd" --image "$img" --format raw --socket "$sock" --pid-file "$server_pidfile" \
            --cache none >"$log" 2>&1 & ;;
    cbt-bitmap)
        rm -f "$tmp/bench.bitmap"
        "$filterd" --image "$img" --format raw --socket "$sock" --pid-file "$server_pidfile" \
            --bitmap "$tmp/bench.bitmap" >"$log" 2>&1 & ;;
    cbt-bitmap-warm|cbt-base-warm)
        rm -f "$tmp/bench.bitmap"
        local bin=$filterd
        [[ $name == cbt-base-warm ]] && bin=$filterd_base
        "$bin" --image "$img" --format raw --socket "$sock" --pid-file "$server_pidfile" \
            --bitmap "$tmp/bench.bitmap" >"$log" 2>&1 & ;;
    cbt-lazy)
        rm -f "$tmp/bench.bitmap"
        "$filterd" --image "$img" --format raw --socket "$sock" --pid-file "$server_pidfile" \
            --bitmap "$tmp/bench.bitmap" --tracking lazy >"$log" 2>&1 & ;;
    qemu-nbd)
        qemu-nbd -f raw --aio=io_uring --cache=writeback --persistent --shared=8 \
            -k "$sock" --pid-file "$server_pidfile" "$img" >"$log" 2>&1 & ;;
    qemu-nbd-none)
        qemu-nbd -f raw --aio=io_uring --cache=none --persistent --shared=8 \
            -k "$sock" --pid-file "$server_pidfile" "$img" >"$log" 2>&1 & ;;
    nbdkit-file)
        nbdkit --foreground -U "$sock" -P "$server_pidfile" file "$img" \
            >"$log" 2>&1 & ;;
    nbdkit-null)
        nbdkit --foreground -U "$sock" -P "$server_pidfile" null "$size_bytes" \
            >"$log" 2>&1 & ;;
    cbt-qcow2)
        "$filterd" --image "$qimg" --format qcow2 --socket "$sock" --pid-file "$server_pidfile" \
            >"$log" 2>&1 & ;;
    qemu-nbd-qcow2)
        qemu-nbd -f qcow2 --aio=io_uring --cache=writeback --persistent --shared=8 \
            -k "$sock" --pid-file "$server_pidfile" "$qimg" >"$log" 2>&1 & ;;
    esac
    server_pid=$!
    for _ in $(seq 100); do
        if [[ -S $sock && -s $server_pidfile ]]; then
            [[ $name == cbt-bitmap-warm || $name == cbt-base-warm ]] || return 0
            # Dirty (and commit) every granule before the measured run.
            fio --name=warm --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
                $(workload_args firstwrite4k-qd32) --size="$size_bytes" \
                --output="$tmp/warm.out" >/dev/null 2>&1 || die "warming $name failed"
            return 0
        fi
        if ! kill -0 "$server_pid" 2>/dev/null && [[ ! -s $server_pidfile ]]; then
            cat "$log" >&2
            die "$name exited before it listened on $sock"
        fi
        sleep 0.1
    done
    cat "$log" >&2
    die "$name did not listen on $sock within 10 s"
}

echo "fio-compare: servers: ${servers[*]}"
echo "fio-compare: workloads: ${workloads[*]}"
echo "fio-compare: $ROUNDS round(s) of ${RUNTIME}s runs (+${RAMP}s ramp), image in $tmp"
echo "fio-compare: load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "fio-compare: writing the 2 GiB image (not sparse)"
dd if=/dev/urandom of="$img" bs=1M count=2048 iflag=fullblock conv=fsync status=none
echo "fio-compare: image allocated: $(du -h "$img" | cut -f1)"
qimg=$tmp/disk.qcow2
if [[ " ${servers[*]} " == *-qcow2\ * ]]; then
    echo "fio-compare: converting it to qcow2 (64 KiB clusters)"
    qemu-img convert -f raw -O qcow2 -o cluster_size=65536 "$img" "$qimg"
fi

nserv=${#servers[@]}
total=0
for w in "${workloads[@]}"; do
    for s in "${servers[@]}"; do
        skip "$s" "$w" || total=$((total + ROUNDS))
    done
done
run=0
for ((r = 0; r < ROUNDS; r++)); do
    for ((k = 0; k < ${#workloads[@]}; k++)); do
        w=${workloads[$k]}
        read -r -a wargs <<<"$(workload_args "$w")"
        for ((i = 0; i < nserv; i++)); do
            # Rotate the starting server every round and every workload.
            s=${servers[$(( (i + r + k) % nserv ))]}
            skip "$s" "$w" && continue
            run=$((run + 1))
            sock=$tmp/$s.sock
            start_server "$s" "$sock"
            sync "$img"
            [[ -e $qimg ]] && sync "$qimg"
            out=$resdir/$w.$s.$r.json
            printf 'fio-compare: [%3d/%d] round %d %-17s %-15s ' \
                "$run" "$total" "$((r + 1))" "$w" "$s"
            # firstwrite workloads run a fixed set of writes, each once.
            if [[ $w == firstwrite* ]]; then
                targs=(--randrepeat=0)
            else
                targs=(--norandommap --randrepeat=0 --runtime="$RUNTIME"
                       --ramp_time="$RAMP" --time_based)
            fi
            if ! fio --name="$w" --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
                    "${wargs[@]}" --numjobs=1 --size="$size_bytes" "${targs[@]}" \
                    --output-format=json --output="$out" >"$tmp/fio.err" 2>&1; then
                echo
                cat "$tmp/fio.err" "$out" >&2 2>/dev/null || true
                die "fio failed for $w on $s"
            fi
            python3 - "$out" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
d = j["write"] if j["write"]["io_bytes"] > j["read"]["io_bytes"] else j["read"]
print("%10.0f IOPS %9.1f MB/s" % (d["iops"], d["bw_bytes"] / 1e6))
EOF
            stop_server
        done
    done
done

meta_fio=$(fio --version)
meta_qemu=$(qemu-nbd --version | head -n1)
meta_nbdkit=$(nbdkit --version | head -n1)
meta_rev=$(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo unknown)

python3 - "$resdir" "$OUT" "$ROUNDS" "$RUNTIME" "$RAMP" "$meta_fio" "$meta_qemu" \
    "$meta_nbdkit" "$meta_rev" "${servers[*]}" "${workloads[*]}" <<'EOF'
import glob, json, os, platform, statistics, sys, time

(resdir, out, rounds, runtime, ramp, v_fio, v_qemu, v_nbdkit, rev,
 servers, workloads) = sys.argv[1:]
servers, workloads = servers.split(), workloads.split()

def measure(path):
    j = json.load(open(path))["jobs"][0]
    d = j["write"] if j["write"]["io_bytes"] > j["read"]["io_bytes"] else j["read"]
    return {"iops": d["iops"], "MBps": d["bw_bytes"] / 1e6,
            "lat_mean_us": d["lat_ns"]["mean"] / 1e3}

results = {}
for w in workloads:
    results[w] = {}
    for s in servers:
        runs = [measure(p) for p in sorted(glob.glob(f"{resdir}/{w}.{s}.*.json"))]
        if not runs:
            continue                   # a pair that is not run
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        results[w][s] = {"median": med, "runs": runs}

pairs = [(a, b) for a, b in [("cbt", "nbdkit-file"), ("cbt", "qemu-nbd"),
                             ("cbt", "nbdkit-null"), ("cbt-none", "qemu-nbd-none"),
                             ("cbt-bitmap", "cbt"), ("cbt-lazy", "cbt"),
                             ("cbt-bitmap", "cbt-lazy"), ("cbt-bitmap-warm", "cbt"),
                             ("cbt-bitmap", "nbdkit-file"),
                             ("cbt-bitmap-warm", "nbdkit-file"), ("cbt-bitmap-warm", "qemu-nbd"),
                             ("cbt-base-warm", "nbdkit-file"), ("cbt-bitmap-warm", "cbt-base-warm"),
                             ("cbt-bitmap", "qemu-nbd"), ("cbt-qcow2", "qemu-nbd-qcow2")]
         if a in servers and b in servers]
ratios = {w: {f"{a}/{b}": results[w][a]["median"]["iops"] / results[w][b]["median"]["iops"]
              for a, b in pairs if a in results[w] and b in results[w]}
          for w in workloads}

print()
print(f"median of {rounds} run(s), {runtime}s each; one fio job, one NBD connection")
print(f"{'workload':<17} {'server':<15} {'IOPS':>10} {'MB/s':>9} {'lat us':>9}")
for w in workloads:
    for s in servers:
        if s not in results[w]:
            continue
        m = results[w][s]["median"]
        print(f"{w:<17} {s:<15} {m['iops']:>10.0f} {m['MBps']:>9.1f} {m['lat_mean_us']:>9.1f}")
if pairs:
    print()
    names = [f"{a}/{b}" for a, b in pairs]
    print(f"{'IOPS ratio':<17} " + " ".join(f"{n:>22}" for n in names))
    for w in workloads:
        print(f"{w:<17} " + " ".join(f"{ratios[w][n]:>22.2f}" if n in ratios[w] else f"{'-':>22}"
                                      for n in names))

# Issue 11's targets: cbt with a crash-safe bitmap against nbdkit file.
targets = {"randwrite4k-qd1": ">= 1.1", "randwrite4k-qd32": ">= 2.0",
           "randread4k-qd1": "no loss", "randread4k-qd32": "no loss",
           "seqread64k-qd32": "no loss"}
issue = []
for w in workloads:
    cbt = "cbt-bitmap" if w.startswith("firstwrite") else "cbt-bitmap-warm"
    if cbt not in results[w]:
        cbt = "cbt-bitmap" if "cbt-bitmap" in results[w] else None
    if cbt and "nbdkit-file" in results[w]:
        issue.append((w, cbt))
if issue:
    def iops(w, s):
        return results[w][s]["median"]["iops"] if s in results[w] else None
    def ratio(a, b):
        return f"{a / b:.2f}" if a and b else "-"
    print()
    print("issue 11 data path: cbt with a crash-safe bitmap (steady state, or a fresh "
          "bitmap for firstwrite) against the others, IOPS medians")
    print(f"{'workload':<17} {'cbt':<15} {'cbt IOPS':>9} {'nbdkit-file':>11} {'ratio':>6} "
          f"{'target':>8} {'qemu-nbd':>9} {'ratio':>6} {'nbdkit-null':>11} {'ratio':>6}")
    for w, cbt in issue:
        c, n = iops(w, cbt), iops(w, "nbdkit-file")
        q, z = iops(w, "qemu-nbd"), iops(w, "nbdkit-null")
        def num(x):
            return f"{x:.0f}" if x else "-"
        print(f"{w:<17} {cbt:<15} {c:>9.0f} {n:>11.0f} {ratio(c, n):>6} "
              f"{targets.get(w, ''):>8} {num(q):>9} {ratio(c, q):>6} "
              f"{num(z):>11} {ratio(c, z):>6}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

doc = {
    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "cbt_rev": rev, "kernel": platform.release(), "cpus": os.cpu_count(),
    "fio": v_fio, "qemu_nbd": v_qemu, "nbdkit": v_nbdkit,
    "rounds": int(rounds), "runtime_s": int(runtime), "ramp_s": int(ramp),
    "image_bytes": 2 << 30, "servers": servers, "workloads": workloads,
    "results": results, "iops_ratios": ratios,
}
with open(out, "w") as f:
    json.dump(doc, f, indent=2)
print(f"\nfio-compare: results written to {out}")
EOF
