#!/usr/bin/env bash
# cbt restore reads exactly the files the manifest's chain lists, in the
# repository, as regular files: never a backing file named inside a
# qcow2.  A repository of a full and two incrementals is restored as it
# is, then tampered with in copies of it:
#   - an incremental rebased (qemu-img rebase -u) onto a file outside the
#     repository, or onto another file in it;
#   - the full backup given a backing file;
#   - a backup file replaced by a symbolic link to a copy of itself
#     outside the repository (same bytes: still refused);
#   - a backup file replaced by a FIFO.
# Each restore must exit 4 naming the file and the disagreement, leave no
# output file, and never hang (timeout; 124 fails the test).

source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img jq cmp timeout mkfifo

disk=$tmp/disk.img
repo=$tmp/repo
csock=$tmp/ctl.sock
truncate -s 16M "$disk"
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --control "$csock"

io() { qio -f raw "$uri" "$@"; }
backup()
{
    cbt backup --socket "$sock" --control "$csock" --repo "$repo" "$@" >/dev/null 2>&1 ||
        die "cbt backup $*: failed"
}

io -c 'write -P 0x11 0 4M'
backup --full
io -c 'write -P 0x22 1M 1M'
backup --incremental
io -c 'write -P 0x33 3M 64k'
backup --incremental
cp "$disk" "$tmp/point3.raw"
stop_filterd
mapfile -t files < <(jq -r '.backups[].file' "$repo/manifest.json")
[ "${#files[@]}" -eq 3 ] || die "expected 3 backups, got ${#files[@]}"
full=${files[0]} inc1=${files[1]} inc2=${files[2]}

# The untouched repository restores.
cbt restore --repo "$repo" --output "$tmp/ok.raw" 2>/dev/null || die "restore failed"
cmp "$tmp/ok.raw" "$tmp/point3.raw" || die "restore differs from the image"

# Outside the repository: a qcow2 of the same size with other data.
qemu-img create -q -f qcow2 "$tmp/elsewhere.qcow2" 16M
qemu-io -f qcow2 -c 'write -P 0x99 0 16M' "$tmp/elsewhere.qcow2" >/dev/null

n=0
# tampered NAME SETUP...: copy the repository, run SETUP in it (with $r
# set to the copy), then restore the newest backup from it.  $out holds
# the restore's output; it must exit 4 within the timeout and leave no
# output file.
tampered()
{
    local name=$1 rc=0
    shift
    n=$((n + 1))
    r=$tmp/repo-$n
    cp -a "$repo" "$r"
    "$@"
    out=$(timeout 20 "$CBT_CLI" restore --repo "$r" --output "$tmp/out-$n.raw" 2>&1) || rc=$?
    [ "$rc" -ne 124 ] || die "$name: restore hung (timeout)"
    [ "$rc" -eq 4 ] || { echo "$out" >&2; die "$name: restore exit $rc, expected 4"; }
    [ ! -e "$tmp/out-$n.raw" ] || die "$name: restore left $tmp/out-$n.raw"
    echo "$name: $out"
}

rebase_out() { qemu-img rebase -q -u -f qcow2 -b "$tmp/elsewhere.qcow2" -F qcow2 "$r/$inc1"; }
tampered "rebased out of the repository" rebase_out
has "$r/$inc1: names backing file '$tmp/elsewhere.qcow2', but its chain has '$full'"

rebase_in() { qemu-img rebase -q -u -f qcow2 -b "$full" -F qcow2 "$r/$inc2"; }
tampered "rebased onto another backup" rebase_in
has "$r/$inc2: names backing file '$full', but its chain has '$inc1'"

full_backed() { qemu-img rebase -q -u -f qcow2 -b "$tmp/elsewhere.qcow2" -F qcow2 "$r/$full"; }
tampered "full backup with a backing file" full_backed
has "$r/$full: names backing file '$tmp/elsewhere.qcow2', but its chain has none"

symlink_out()
{
    cp "$r/$full" "$tmp/full-copy-$n.qcow2"
    ln -sf "$tmp/full-copy-$n.qcow2" "$r/$full"
}
tampered "full backup a symlink out of the repository" symlink_out
has "$r/$full: is a symbolic link"

symlink_top()
{
    cp "$r/$inc2" "$tmp/inc2-copy-$n.qcow2"
    ln -sf "$tmp/inc2-copy-$n.qcow2" "$r/$inc2"
}
tampered "newest backup a symlink" symlink_top
has "$r/$inc2: is a symbolic link"

fifo() { rm "$r/$inc1"; mkfifo "$r/$inc1"; }
tampered "backup replaced by a FIFO" fifo
has "$r/$inc1: not a regular file"

echo ok
