#!/usr/bin/env bash
# qcow2 allocating writes: fio 4k random writes at QD32 (--ioengine=nbd,
# one connection) on a freshly created qcow2 image, so nearly every write
# is the first one to its cluster and allocates it.
#
# Every run gets a new image (qemu-img create -f qcow2, 64 KiB clusters,
# SIZE virtual) and a fresh server on a unix socket in a private temp
# directory.  After the run the server is stopped and `qemu-img check`
# must find the image clean (a benchmark of a corrupting server is
# worthless); the allocated size is reported too.  Servers:
#
#   cbt        $CBT_FILTERD --format qcow2 (cache writeback)
#   cbt-b      $CBT_FILTERD_B, the same: a second build, for A/B runs
#   qemu-nbd   qemu-nbd -f qcow2 --aio=io_uring --cache=writeback
#
# nbdkit has no qcow2 writer (its qcow2dec filter is read-only), so
# qemu-nbd is the reference.
#
# Fairness: within a round the servers take turns, the first one rotating
# from round to round; medians of ROUNDS runs are reported with the load
# average before the first run.  The binaries are copied at the start, so
# a rebuild during the run changes nothing.
#
# Environment (defaults in brackets):
#   ROUNDS [5]          runs per server
#   RUNTIME [10]        seconds per fio run (time based)
#   SIZE [16G]          virtual size of the image
#   QD [32]             fio iodepth
#   BS [4k]             fio block size
#   SERVERS             [cbt qemu-nbd], or e.g. "cbt cbt-b qemu-nbd"
#   CBT_FILTERD         [build/filterd/cbt-filterd]
#   CBT_FILTERD_B       second daemon binary for cbt-b
#   OUT                 JSON result file [${TMPDIR:-/tmp}/cbt-qcow2-alloc-DATE.json]
#   TMPDIR              where the private directory goes

set -euo pipefail

cd "$(dirname "$0")/.."
src=$PWD

ROUNDS=${ROUNDS:-5}
RUNTIME=${RUNTIME:-10}
SIZE=${SIZE:-16G}
QD=${QD:-32}
BS=${BS:-4k}
stamp=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-${TMPDIR:-/tmp}/cbt-qcow2-alloc-$stamp.json}
read -r -a servers <<<"${SERVERS:-cbt qemu-nbd}"

die() { echo "qcow2-alloc: $*" >&2; exit 1; }

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS=$ROUNDS: not a positive number"
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RUNTIME=$RUNTIME: not a positive number"
[[ $QD =~ ^[1-9][0-9]*$ ]] || die "QD=$QD: not a positive number"
for tool in fio qemu-nbd qemu-img python3; do
    command -v "$tool" >/dev/null || die "$tool not found (bash tests/install-deps.sh)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cbt-qcow2-alloc.XXXXXX")
chmod 700 "$tmp"
resdir=$tmp/results
mkdir "$resdir"

for s in "${servers[@]}"; do
    case $s in
    cbt)   bin=${CBT_FILTERD:-$src/build/filterd/cbt-filterd} ;;
    cbt-b) bin=${CBT_FILTERD_B:-} ;;
    qemu-nbd) continue ;;
    *) die "unknown server '$s'" ;;
    esac
    [[ -n $bin && -x $bin ]] || die "$s: daemon binary '${bin:-}' not found (ninja -C build)"
    cp "$bin" "$tmp/$s-filterd"
done

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
    for _ in $(seq 300); do
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

# start_server NAME SOCK IMG: start it in the background, wait until it listens.
start_server() {
    local name=$1 sock=$2 img=$3 log=$tmp/server.log
    server_pidfile=$tmp/server.pid
    rm -f "$sock" "$server_pidfile"
    case $name in
    cbt|cbt-b)
        "$tmp/$name-filterd" --image "$img" --format qcow2 --socket "$sock" \
            --pid-file "$server_pidfile" >"$log" 2>&1 & ;;
    qemu-nbd)
        qemu-nbd -f qcow2 --aio=io_uring --cache=writeback --persistent --shared=8 \
            -k "$sock" --pid-file "$server_pidfile" "$img" >"$log" 2>&1 & ;;
    esac
    server_pid=$!
    for _ in $(seq 100); do
        [[ -S $sock && -s $server_pidfile ]] && return 0
        if ! kill -0 "$server_pid" 2>/dev/null && [[ ! -s $server_pidfile ]]; then
            cat "$log" >&2
            die "$name exited before it listened on $sock"
        fi
        sleep 0.1
    done
    cat "$log" >&2
    die "$name did not listen on $sock within 10 s"
}

load=$(cut -d' ' -f1-3 /proc/loadavg)
echo "qcow2-alloc: servers: ${servers[*]}; load average $load"
echo "qcow2-alloc: $ROUNDS round(s) of ${RUNTIME}s, randwrite bs=$BS QD$QD on a fresh $SIZE qcow2"

nserv=${#servers[@]}
for ((r = 0; r < ROUNDS; r++)); do
    for ((i = 0; i < nserv; i++)); do
        s=${servers[$(( (i + r) % nserv ))]}
        img=$tmp/disk.qcow2
        rm -f "$img"
        qemu-img create -q -f qcow2 -o cluster_size=65536 "$img" "$SIZE"
        sock=$tmp/$s.sock
        start_server "$s" "$sock" "$img"
        out=$resdir/$s.$r.json
        printf 'qcow2-alloc: round %d %-9s ' "$((r + 1))" "$s"
        if ! fio --name=alloc --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
                --rw=randwrite --bs="$BS" --iodepth="$QD" --numjobs=1 \
                --norandommap --randrepeat=0 --runtime="$RUNTIME" --time_based \
                --output-format=json --output="$out" >"$tmp/fio.err" 2>&1; then
            echo
            cat "$tmp/fio.err" "$out" >&2 2>/dev/null || true
            die "fio failed on $s"
        fi
        stop_server
        qemu-img check "$img" >"$tmp/check.out" 2>&1 ||
            { cat "$tmp/check.out" >&2; die "$s: qemu-img check failed after the run"; }
        alloc=$(du -k "$img" | cut -f1)
        python3 - "$out" "$alloc" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]["write"]
j["alloc_kib"] = int(sys.argv[2])
print("%9.0f IOPS %7.1f MB/s  file %6.0f MiB" % (j["iops"], j["bw_bytes"] / 1e6,
                                                 j["alloc_kib"] / 1024))
doc = json.load(open(sys.argv[1]))
doc["jobs"][0]["write"]["alloc_kib"] = int(sys.argv[2])
json.dump(doc, open(sys.argv[1], "w"))
EOF
    done
done

meta_rev=$(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo unknown)
python3 - "$resdir" "$OUT" "$ROUNDS" "$RUNTIME" "$SIZE" "$QD" "$BS" "$load" \
    "$meta_rev" "$(qemu-nbd --version | head -n1)" "${servers[*]}" <<'EOF'
import glob, json, os, platform, statistics, sys, time

resdir, out, rounds, runtime, size, qd, bs, load, rev, v_qemu, servers = sys.argv[1:]
servers = servers.split()
results = {}
for s in servers:
    runs = []
    for p in sorted(glob.glob(f"{resdir}/{s}.*.json")):
        w = json.load(open(p))["jobs"][0]["write"]
        runs.append({"iops": w["iops"], "lat_mean_us": w["lat_ns"]["mean"] / 1e3,
                     "alloc_mib": w["alloc_kib"] / 1024})
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    results[s] = {"median": med, "runs": runs}

print()
print(f"median of {rounds} run(s), {runtime}s each, randwrite {bs} QD{qd}, "
      f"fresh {size} qcow2 per run; load average before: {load}")
print(f"{'server':<9} {'IOPS':>9} {'lat us':>8} {'file MiB':>9}  runs")
for s in servers:
    m = results[s]["median"]
    runs = " ".join(f"{r['iops']:.0f}" for r in results[s]["runs"])
    print(f"{s:<9} {m['iops']:>9.0f} {m['lat_mean_us']:>8.0f} {m['alloc_mib']:>9.0f}  {runs}")
ratios = {}
if "qemu-nbd" in servers:
    for s in servers:
        if s != "qemu-nbd":
            ratios[f"{s}/qemu-nbd"] = (results[s]["median"]["iops"] /
                                       results["qemu-nbd"]["median"]["iops"])
if "cbt" in servers and "cbt-b" in servers:
    ratios["cbt-b/cbt"] = results["cbt-b"]["median"]["iops"] / results["cbt"]["median"]["iops"]
for k, v in ratios.items():
    print(f"{k}: {v:.2f}x")
doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cbt_rev": rev,
       "kernel": platform.release(), "cpus": os.cpu_count(), "qemu_nbd": v_qemu,
       "load_before": load, "rounds": int(rounds), "runtime_s": int(runtime),
       "size": size, "qd": int(qd), "bs": bs, "results": results, "iops_ratios": ratios}
with open(out, "w") as f:
    json.dump(doc, f, indent=2)
print(f"\nqcow2-alloc: results written to {out}")
EOF
