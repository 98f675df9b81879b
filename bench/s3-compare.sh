#!/usr/bin/env bash
# Backups to and restores from an S3 repository (issue 15) against the
# copy-then-transfer routes, on a local Ceph RADOS Gateway
# (tests/ceph-rgw.sh), ratios from one run:
#
#   restore      `cbt restore --repo s3://...` of a full backup to a raw
#                file (parallel ranged GETs, checksums checked, fsync)  vs
#                `cbt s3 get` of its qcow2 object (4 ranged GETs in flight)
#                followed by `qemu-img convert -O raw` and sync, and vs
#                `s3cmd get` + the same convert when s3cmd is installed;
#                and `cat` of disk.raw of `cbt mount --repo s3://...` of
#                the point (ranged GETs of 4 MiB blocks with readahead) to
#                /dev/null, when FUSE is there (mount_cat)
#   backup       `cbt backup --full --repo s3://...` (multipart upload as
#                the data passes, checksums, manifest)  vs  the same to a
#                directory, vs `nbdcopy` of the export to a raw file
#                followed by `cbt s3 put` of it, and vs a plain upload of
#                the same bytes: `cbt s3 put` of the raw file alone, and
#                `s3cmd put` when s3cmd is installed
#
# One image, written once from /dev/urandom (SIZE_MIB, fully allocated,
# so every byte is data), served by one cbt-filterd for the whole run.
# In every group the order of the sides rotates from round to round, so
# all see the same background load on average.  Objects and files of a
# round are deleted at its end.  The image stays in the page cache (a
# busy VM's disk); the restore outputs are synced inside their timing.
#
#   ninja -C build
#   CEPH_RGW_STORE=bluestore bash bench/s3-compare.sh     # ROUNDS=3
#
# Environment: ROUNDS, SIZE_MIB (default 2048), CBT_BUILD_DIR (default
# build), TMPDIR (image, outputs and the OSD's file: about 6x SIZE_MIB),
# CEPH_RGW_STORE (memstore, the helper's default, keeps every object in
# memory; bluestore puts them on a sparse file of CEPH_RGW_SIZE bytes,
# here 8x SIZE_MIB by default), CBT_S3_TEST_ENV=DIR/env to use a cluster
# already running (tests/ceph-rgw.sh start DIR).
#
# Timing is wall clock; the medians of ROUNDS runs and their ratios are
# printed, and every run as it happens.

set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
build=${CBT_BUILD_DIR:-$src/build}
cbt=$build/cbt/cbt
filterd=$build/filterd/cbt-filterd
rounds=${ROUNDS:-3}
size_mib=${SIZE_MIB:-2048}

for t in nbdcopy qemu-img python3; do
    command -v "$t" >/dev/null || { echo "s3-compare: needs $t" >&2; exit 1; }
done
[ -x "$cbt" ] && [ -x "$filterd" ] || { echo "s3-compare: build first (ninja -C $build)" >&2; exit 1; }
have_s3cmd=
command -v s3cmd >/dev/null && have_s3cmd=1

dir=$(mktemp -d "${TMPDIR:-/tmp}/cbt-s3-compare.XXXXXX")
dpid=
started_ceph=
cleanup()
{
    [ -n "$dpid" ] && kill "$dpid" 2>/dev/null && wait "$dpid" 2>/dev/null
    [ -n "$started_ceph" ] && bash "$src/tests/ceph-rgw.sh" stop "$dir/ceph" >/dev/null 2>&1
    rm -rf "$dir"
}
trap cleanup EXIT

if [ -n "${CBT_S3_TEST_ENV:-}" ]; then
    envf=$CBT_S3_TEST_ENV
else
    echo "s3-compare: starting a Ceph cluster (${CEPH_RGW_STORE:-memstore}) in $dir/ceph"
    started_ceph=1
    # Room for the objects of a round and then some (a full OSD stops).
    CEPH_RGW_SIZE=${CEPH_RGW_SIZE:-$((size_mib * 8 << 20))} \
        bash "$src/tests/ceph-rgw.sh" start "$dir/ceph" >"$dir/ceph.log" 2>&1 ||
        { cat "$dir/ceph.log" >&2; echo "s3-compare: no Ceph cluster" >&2; exit 1; }
    envf=$dir/ceph/env
fi
set -a
# shellcheck disable=SC1090
. "$envf"
set +a
bucket=cbt-bench-$$
"$cbt" s3 mb "s3://$bucket" >/dev/null
if [ -n "$have_s3cmd" ]; then
    hostport=${AWS_ENDPOINT_URL#http://}
    cat >"$dir/s3cfg" <<EOF
[default]
access_key = $AWS_ACCESS_KEY_ID
secret_key = $AWS_SECRET_ACCESS_KEY
host_base = $hostport
host_bucket = $hostport
use_https = False
signature_v2 = False
bucket_location = us-east-1
EOF
    s3cmd() { command s3cmd -c "$dir/s3cfg" --no-progress --quiet "$@"; }
fi

img=$dir/disk.img
sock=$dir/nbd.sock
ctl=$dir/ctl.sock
uri="nbd+unix:///?socket=$sock"
echo "s3-compare: writing a ${size_mib} MiB image of random data in $dir"
head -c $((size_mib << 20)) /dev/urandom >"$img"
sync "$img"
"$filterd" --image "$img" --bitmap "$dir/disk.bitmap" --control "$ctl" --socket "$sock" \
    --pid-file "$dir/pid" >"$dir/filterd.log" 2>&1 &
dpid=$!
for _ in $(seq 100); do [ -s "$dir/pid" ] && break; sleep 0.1; done
[ -S "$sock" ] || { cat "$dir/filterd.log"; echo "s3-compare: daemon did not start" >&2; exit 1; }
cat "$img" >/dev/null

declare -A times=()
# run NAME CMD...: time CMD (wall clock), append the seconds to times[NAME].
run()
{
    local name=$1 t0 t1 s
    shift
    t0=$(date +%s.%N)
    "$@" >"$dir/run.log" 2>&1 || { cat "$dir/run.log" >&2; echo "s3-compare: $name failed" >&2; exit 1; }
    t1=$(date +%s.%N)
    s=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
    times[$name]="${times[$name]:-} $s"
    printf '  %-16s %7s s  %6.0f MiB/s\n' "$name" "$s" "$(python3 -c "print($size_mib / ($t1 - $t0))")"
}

# The sides of each group, rotated by the round number.
rotate()
{
    local k=$1
    shift
    local a=("$@") n=$# i
    for (( i = 0; i < n; i++ )); do
        echo "${a[(i + k) % n]}"
    done
}

backup_s3() { "$cbt" backup --socket "$sock" --control "$ctl" --full --repo "s3://$bucket/r$round" -q; }
backup_dir() { "$cbt" backup --socket "$sock" --control "$ctl" --full --repo "$dir/repo$round" -q; }
copy_put()
{
    nbdcopy "$uri" "$dir/copy.raw" &&
        "$cbt" s3 put -q "$dir/copy.raw" "s3://$bucket/copy$round.raw"
}
plain_put() { "$cbt" s3 put -q "$dir/copy.raw" "s3://$bucket/plain$round.raw"; }
s3cmd_put() { s3cmd put "$dir/copy.raw" "s3://$bucket/s3cmd$round.raw"; }
# Remove what a side uploaded that nothing reads later.  RGW frees the
# space of deleted objects only when its garbage collector runs (hours
# later by default), and a full OSD stalls every request, so run it now.
gc()
{
    [ -n "${CEPH_RGW_DIR:-}" ] && command -v radosgw-admin >/dev/null || return 0
    radosgw-admin -c "$CEPH_RGW_DIR/ceph.conf" gc process --include-all >/dev/null 2>&1 ||
        echo "s3-compare: radosgw-admin gc process failed" >&2
}
drop() { "$cbt" s3 rm "s3://$bucket/$1" && gc; }
restore_s3()
{
    rm -f "$dir/out.raw"
    "$cbt" restore -q --repo "s3://$bucket/r$round" --output "$dir/out.raw"
}
# The file of the S3 repository's newest backup, from its manifest.
s3_top_file()
{
    "$cbt" s3 get -q "s3://$bucket/r$round/manifest.json" - |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["backups"][-1]["file"])'
}
get_convert()
{
    local f
    f=$(s3_top_file)
    rm -f "$dir/got.qcow2" "$dir/conv.raw"
    "$cbt" s3 get -q "s3://$bucket/r$round/$f" "$dir/got.qcow2" &&
        qemu-img convert -f qcow2 -O raw "$dir/got.qcow2" "$dir/conv.raw" && sync "$dir/conv.raw"
}
s3cmd_convert()
{
    local f
    f=$(s3_top_file)
    rm -f "$dir/got.qcow2" "$dir/conv.raw"
    s3cmd get "s3://$bucket/r$round/$f" "$dir/got.qcow2" &&
        qemu-img convert -f qcow2 -O raw "$dir/got.qcow2" "$dir/conv.raw" && sync "$dir/conv.raw"
}

mount_cat()
{
    local i mpid ok=
    mkdir -p "$dir/mnt"
    "$cbt" mount -q --repo "s3://$bucket/r$round" "$dir/mnt" &
    mpid=$!
    for (( i = 0; i < 300; i++ )); do
        [ -f "$dir/mnt/disk.raw" ] && break
        sleep 0.05
    done
    cat "$dir/mnt/disk.raw" >/dev/null && ok=1
    "$cbt" umount "$dir/mnt"
    wait $mpid
    [ -n "$ok" ]
}

backups=(backup_s3 backup_dir copy_put plain_put)
restores=(restore_s3 get_convert)
if [ -w /dev/fuse ] && command -v fusermount3 >/dev/null; then
    restores+=(mount_cat)
fi
if [ -n "$have_s3cmd" ]; then
    backups+=(s3cmd_put)
    restores+=(s3cmd_convert)
fi

for (( round = 1; round <= rounds; round++ )); do
    echo "round $round"
    rm -f "$dir/copy.raw"
    # copy_put makes the file plain_put and s3cmd_put send: it goes first.
    run copy_put copy_put
    drop "copy$round.raw"
    for f in $(rotate $round "${backups[@]}"); do
        [ "$f" = copy_put ] || run "$f" "$f"
        case $f in
            plain_put) drop "plain$round.raw" ;;
            s3cmd_put) drop "s3cmd$round.raw" ;;
        esac
    done
    for f in $(rotate $round "${restores[@]}"); do
        run "$f" "$f"
    done
    cmp "$img" "$dir/out.raw" || { echo "s3-compare: the restore from S3 differs" >&2; exit 1; }
    cmp "$img" "$dir/conv.raw" || { echo "s3-compare: get + convert differs" >&2; exit 1; }
    # Clean up the round.
    for k in $("$cbt" s3 ls "s3://$bucket/" | awk '{print $2}'); do
        "$cbt" s3 rm "s3://$bucket/$k"
    done
    gc
    rm -rf "$dir/repo$round" "$dir/out.raw" "$dir/conv.raw" "$dir/got.qcow2" "$dir/copy.raw"
done

median() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo
echo "medians of $rounds rounds, ${size_mib} MiB of random data:"
for n in "${backups[@]}" "${restores[@]}"; do
    printf '  %-16s %7s s\n' "$n" "$(median "${times[$n]}")"
done
ratio() { python3 -c "print(f'{$(median "${times[$1]}") / $(median "${times[$2]}"):.2f}')"; }
echo "ratios (below 1: cbt is faster):"
echo "  cbt backup to S3 / to a directory:            $(ratio backup_s3 backup_dir)"
echo "  cbt backup to S3 / nbdcopy + cbt s3 put:      $(ratio backup_s3 copy_put)"
echo "  cbt backup to S3 / cbt s3 put of the bytes:   $(ratio backup_s3 plain_put)"
[ -n "$have_s3cmd" ] &&
echo "  cbt backup to S3 / s3cmd put of the bytes:    $(ratio backup_s3 s3cmd_put)"
echo "  cbt restore from S3 / cbt s3 get + convert:   $(ratio restore_s3 get_convert)"
[ -n "${times[mount_cat]:-}" ] &&
echo "  cat of cbt mount from S3 / cbt restore:       $(ratio mount_cat restore_s3)"
[ -n "$have_s3cmd" ] &&
echo "  cbt restore from S3 / s3cmd get + convert:    $(ratio restore_s3 s3cmd_convert)"
exit 0
