#!/usr/bin/env bash
# Who may read a cbt mount's disk.raw.  The backup files are 0600, so the
# mounted disk is no more open than they are:
#   - without options, and with --allow-other, disk.raw is 0400, owned by
#     the mounting user; with --allow-other another user (nobody) is
#     refused (EACCES) while the owner reads it;
#   - --group GROUP makes it 0440 with that group (and implies
#     --allow-other): a member of GROUP reads it, another user still may
#     not; an unknown group is a usage error (2).
# The other-user checks need root (setpriv, and allow_other without
# user_allow_other in /etc/fuse.conf); without root only the modes are
# checked.  Skips (77) only when FUSE is unavailable.

source "$(dirname "$0")/functions.sh"
requires jq stat mountpoint
[ -c /dev/fuse ] || skip "/dev/fuse is missing: no FUSE in this kernel or container"
root=
if [ "$(id -u)" -eq 0 ]; then
    root=1
    requires setpriv
else
    requires fusermount3
fi

disk=$tmp/disk.img
repo=$tmp/repo
csock=$tmp/ctl.sock
head -c $((4 << 20)) /dev/urandom >"$disk"
truncate -s 16M "$disk"
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --control "$csock"
cbt backup --socket "$sock" --control "$csock" --repo "$repo" --full >/dev/null \
    2>"$tmp/backup.err" || { cat "$tmp/backup.err" >&2; die "cbt backup failed"; }
stop_filterd
full=$(jq -r '.backups[0].file' "$repo/manifest.json")
[ "$(stat -c %a "$repo/$full")" = 600 ] || die "the backup file is not 0600"

# Other users must be able to reach the mountpoint for the checks to
# mean anything: $tmp is 0700.
chmod 0711 "$tmp"
mp=$tmp/mp
mkdir -p "$mp"
chmod 0755 "$mp"
_unmount_only() { { fusermount3 -u "$1" || umount -l "$1"; } 2>/dev/null; return 0; }
cleanup_fn _unmount_only "$mp"

# as UID GID CMD...: run CMD as that user and group, no other groups.
as() { local u=$1 g=$2; shift 2; setpriv --reuid="$u" --regid="$g" --clear-groups "$@"; }
# reads UID GID: "ok" if that user can read the first 4 KiB of disk.raw.
reads()
{
    as "$1" "$2" dd if="$mp/disk.raw" of=/dev/null bs=4k count=1 status=none 2>&1 &&
        echo ok
}

mount_with()
{
    expect_rc 0 cbt mount --daemon --repo "$repo" "$@" "$mp"
    mountpoint -q "$mp" || die "cbt mount $* returned unmounted"
}

mount_with
[ "$(stat -c '%a %u %g' "$mp/disk.raw")" = "400 $(id -u) $(id -g)" ] ||
    die "disk.raw without options: $(stat -c '%a %u %g' "$mp/disk.raw"), expected 400"
cmp -n $((4 << 20)) "$mp/disk.raw" "$disk" || die "the owner cannot read disk.raw"
expect_rc 0 cbt umount "$mp"

if [ -n "$root" ]; then
    mount_with --allow-other
    [ "$(stat -c %a "$mp/disk.raw")" = 400 ] ||
        die "disk.raw with --allow-other: mode $(stat -c %a "$mp/disk.raw"), expected 400"
    out=$(reads 65534 65534) || true
    grep -q "Permission denied" <<<"$out" ||
        die "another user read disk.raw of an --allow-other mount: '$out'"
    expect_rc 0 cbt umount "$mp"
fi

# --group: a numeric gid and a name.
gname=$(getent group 65534 | cut -d: -f1) || gname=
for g in 65534 ${gname:+"$gname"}; do
    if [ -z "$root" ]; then
        # Without root allow_other needs user_allow_other: only the mode.
        grep -qx 'user_allow_other' /etc/fuse.conf 2>/dev/null || break
    fi
    mount_with --group "$g"
    [ "$(stat -c '%a %g' "$mp/disk.raw")" = "440 65534" ] ||
        die "disk.raw with --group $g: $(stat -c '%a %g' "$mp/disk.raw"), expected 440 65534"
    if [ -n "$root" ]; then
        [ "$(reads 65534 65534)" = ok ] || die "a member of group $g cannot read disk.raw"
        out=$(reads 65534 65533) || true
        grep -q "Permission denied" <<<"$out" ||
            die "a user outside group $g read disk.raw: '$out'"
    fi
    expect_rc 0 cbt umount "$mp"
done
expect_rc 2 cbt mount --repo "$repo" --group no-such-group-cbt "$mp"
has "no-such-group-cbt"
! mountpoint -q "$mp" || die "mounted with an unknown group"

echo ok
