#!/usr/bin/env bash
# A directory repository's lock file (DIR/.lock) must be a regular file in
# the repository: backup and prune write their pid into it, so one that
# is a symbolic link would have them truncate and write whatever it
# points to (with the rights of whoever runs cbt, often root), and a
# dangling one would create its target.  Each of backup, prune, verify
# and restore (exclusive and shared locks) must refuse, with exit status
# 4 and a message naming the path and the reason, and leave the rest
# alone:
#   - a symbolic link to a file outside the repository: the file is
#     unchanged (checksum);
#   - a dangling symbolic link: its target is not created;
#   - a FIFO and a directory: refused at once (no hang, no open of the
#     FIFO for I/O);
# then, with the lock a regular file again, the same commands work.

source "$(dirname "$0")/functions.sh"
requires sha256sum mkfifo timeout

size=$((16 * 1024 * 1024))
disk=$tmp/disk.img
repo=$tmp/repo
csock=$tmp/ctl.sock
head -c "$size" /dev/urandom >"$disk"
start_filterd --image "$disk" --bitmap "$tmp/disk.bitmap" --control "$csock"
expect_rc 0 cbt backup --socket "$sock" --control "$csock" --repo "$repo" --full
cp "$repo/manifest.json" "$tmp/manifest.before"

# Every command that takes the lock.  timeout only guards against a hang
# (a FIFO opened for reading waits for a writer): a refusal is immediate.
commands=(
    "backup --socket $sock --control $csock --repo $repo"
    "prune --repo $repo --keep-chains 1"
    "verify --repo $repo"
    "restore --repo $repo --output $tmp/restored.raw"
)

# refused WHAT REASON: every command exits 4 naming $repo/.lock and REASON,
# and changes neither the manifest nor (restore) creates its output.
refused()
{
    local what=$1 reason=$2 c
    for c in "${commands[@]}"; do
        # shellcheck disable=SC2086
        expect_rc 4 timeout 60 "$CBT_CLI" $c
        has "$repo/.lock: $reason"
        [ ! -e "$tmp/restored.raw" ] || die "$what: cbt ${c%% *} wrote its output"
        cmp -s "$tmp/manifest.before" "$repo/manifest.json" ||
            die "$what: cbt ${c%% *} changed the manifest"
    done
}

# A symbolic link to a file outside the repository.
rm -f "$repo/.lock"
printf 'important = yes\n' >"$tmp/target.conf"
sum=$(sha256sum <"$tmp/target.conf")
ln -s ../target.conf "$repo/.lock"
refused "symlink to a file" "is a symbolic link"
[ "$(sha256sum <"$tmp/target.conf")" = "$sum" ] ||
    die "the file the lock link points to was changed: $(od -c "$tmp/target.conf" | head -3)"

# A dangling symbolic link: its target must not be created.
rm "$repo/.lock"
ln -s ../created.conf "$repo/.lock"
refused "dangling symlink" "is a symbolic link"
if [ -e "$tmp/created.conf" ] || [ -L "$tmp/created.conf" ]; then
    die "the target of a dangling lock link was created"
fi

# A FIFO, then a directory.
rm "$repo/.lock"
mkfifo "$repo/.lock"
refused "FIFO" "a FIFO, not a regular file"
rm "$repo/.lock"
mkdir "$repo/.lock"
refused "directory" "a directory, not a regular file"
rmdir "$repo/.lock"

# A regular lock file again (and none at all): everything works.
for c in "${commands[@]}"; do
    # shellcheck disable=SC2086
    expect_rc 0 timeout 60 "$CBT_CLI" $c
    rm -f "$tmp/restored.raw"
done
if [ ! -f "$repo/.lock" ] || [ -L "$repo/.lock" ]; then
    die "no regular lock file was created"
fi
exit 0
