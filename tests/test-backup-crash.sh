#!/usr/bin/env bash
# In lazy tracking mode (--tracking lazy), after kill -9 of the daemon its
# bitmap is untrusted: `cbt backup
# --incremental` exits 3 naming the reason, `cbt backup` (auto) takes a full
# backup by itself and says why, and the restore of that backup is the
# image.  A recreated bitmap (new uuid) is detected the same way, and the
# chain continues with incrementals afterwards.

source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img jq cmp

disk=$tmp/disk.img
bm=$tmp/disk.bitmap
repo=$tmp/repo
truncate -s 32M "$disk"

# A fresh control socket path per start: right after kill -9 the dead
# daemon's listening socket may still accept connections for a moment (its
# io_uring is torn down asynchronously), and the new daemon refuses a path
# that looks in use.
daemon()
{
    csock=$(mktemp -u "$tmp/ctl.XXXXXX")
    start_filterd --image "$disk" --bitmap "$bm" --tracking lazy --control "$csock"
}
io() { qio -f raw "$uri" "$@"; }
backup() { cbt backup --socket "$sock" --control "$csock" --repo "$repo" "$@"; }
# restore_is_image: the newest backup restores to exactly the disk.
restore_is_image()
{
    rm -f "$tmp/r.raw"
    cbt restore --repo "$repo" --output "$tmp/r.raw" 2>/dev/null || die "restore failed"
    cmp "$disk" "$tmp/r.raw" || die "restore differs from the image ($1)"
}

daemon
io -c 'write -P 1 0 2M' -c 'write -P 2 16M 1M'
backup >/dev/null 2>&1 || die "first backup failed"
io -c 'write -P 3 1M 64k'
backup --incremental >/dev/null 2>&1 || die "incremental after a full failed"

# Writes, then kill -9: the bitmap is not clean any more.
io -c 'write -P 4 20M 128k' -c 'write -z 0 64k'
kill -KILL "$pid"
wait "$pid" 2>/dev/null || true
daemon

status=0
out=$(backup --incremental 2>&1) || status=$?
[ $status -eq 3 ] || die "--incremental after a crash: exit $status, expected 3: $out"
grep -q 'incremental backup impossible: bitmap not clean after unclean shutdown' <<<"$out" ||
    die "--incremental after a crash: unexpected message: $out"
# Exit 3 left no checkpoint behind and no manifest entry.
[ "$(cbt list --repo "$repo" --json | jq .count)" -eq 2 ] || die "exit 3 added an entry"
[ "$(ctl "$csock" '{"execute":"status"}' | jq -c .return.checkpoint)" = null ] ||
    die "exit 3 left a checkpoint in progress"

out=$(backup --json 2>"$tmp/err") || die "auto backup after a crash failed: $(cat "$tmp/err")"
[ "$(jq -r .kind <<<"$out")" = full ] || die "auto backup after a crash is not full: $out"
grep -q 'bitmap not clean after unclean shutdown: taking a full backup' "$tmp/err" ||
    die "no reason for the full backup: $(cat "$tmp/err")"
restore_is_image "full after crash"

# From the new full on, incrementals again.
io -c 'write -P 5 3M 64k'
backup --incremental >/dev/null 2>&1 || die "incremental after the post-crash full failed"
restore_is_image "incremental after crash"

# A recreated bitmap (clean shutdown, new file, new uuid) also forces a full.
stop_filterd
rm "$bm"
daemon
io -c 'write -P 6 5M 64k'
out=$(backup 2>&1 >/dev/null) || die "backup after bitmap recreation failed: $out"
grep -q 'bitmap was recreated (uuid changed' <<<"$out" || die "unexpected message: $out"
[ "$(cbt list --repo "$repo" --json | jq -r '.backups[-1].kind')" = full ] ||
    die "recreated bitmap did not give a full backup"
restore_is_image "full after bitmap recreation"

# --full is honoured even when an incremental is possible.
backup --full >/dev/null 2>&1
[ "$(cbt list --repo "$repo" --json | jq '.chains')" -eq 4 ] || die "--full did not start a chain"
qemu-img check -q "$repo/$(cbt list --repo "$repo" --json | jq -r '.backups[-1].file')"
cbt verify --repo "$repo" >/dev/null 2>&1 || die "verify failed"
exit 0
