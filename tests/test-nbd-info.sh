#!/usr/bin/env bash
# What the daemon advertises: nbdinfo --json (size of an odd-sized image,
# export name, description, flags, block size constraints, base:allocation),
# nbdinfo --can/--is for every advertised capability, and LIST.

source "$(dirname "$0")/functions.sh"
requires nbdinfo jq

disk=$tmp/disk.img
size=$((1024 * 1024 + 1234))
truncate -s $size "$disk"
descr='cbt test disk: first'

start_filterd --image "$disk" --export-name disk0 --description "$descr"

nbdinfo --json "$uri" >"$tmp/info.json" || die "nbdinfo --json $uri failed"
cat "$tmp/info.json"

# jq -e exits non-zero when the expression is false or null.
check()
{
    jq -e "$1" "$tmp/info.json" >/dev/null || die "nbdinfo --json: expected $1"
}
check '.protocol == "newstyle-fixed"'
check '.structured == true'
check '.exports | length == 1'
check ".exports[0][\"export-size\"] == $size"
check '.exports[0]["export-name"] == "disk0"'
check ".exports[0].description == \"$descr\""
check '.exports[0].is_read_only == false'
check '.exports[0].block_size_minimum == 1'
check '.exports[0].block_size_preferred == 4096'
check '.exports[0].block_size_maximum == 33554432'
check '.exports[0].contexts | index("base:allocation") != null'
for f in can_flush can_fua can_trim can_zero can_fast_zero can_df \
         can_multi_conn can_cache; do
    check ".exports[0].$f == true"
done

# nbdinfo --can/--is exit 0 for true, 2 for false.
for c in connect read write flush fua trim zero fast-zero df multi-conn \
         cache structured-reply; do
    nbdinfo --can "$c" "$uri" || die "nbdinfo --can $c: false, expected true"
done
status=0
nbdinfo --is read-only "$uri" || status=$?
[ $status -eq 2 ] || die "nbdinfo --is read-only: status $status, expected 2"
[ "$(nbdinfo --size "$uri")" = $size ] || die "nbdinfo --size != $size"

# LIST names the export and its description.
nbdinfo --list --json "$uri" >"$tmp/list.json" || die "nbdinfo --list failed"
jq -e ".exports | map(select(.\"export-name\" == \"disk0\")) | length == 1" \
    "$tmp/list.json" >/dev/null || die "nbdinfo --list: export disk0 missing"
nbdinfo --list "nbd+unix:///?socket=$sock" | grep -qx 'export="disk0":' ||
    die "nbdinfo --list (connected as \"\"): export disk0 missing"

stop_filterd

# Default export name is "" and there is no description.
start_filterd --image "$disk"
nbdinfo --json "$uri" >"$tmp/info.json" || die "nbdinfo --json $uri failed"
check '.exports[0]["export-name"] == ""'
check '.exports[0] | (has("description") | not) or .description == ""'
check ".exports[0][\"export-size\"] == $size"
stop_filterd
