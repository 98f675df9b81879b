#!/usr/bin/env bash
# The unix sockets cbt-filterd creates itself (--socket, --control) get
# mode 0600 whatever the umask, or --socket-mode MODE and --socket-group
# GROUP (a name or a number): checked with stat, and by connecting as an
# unprivileged user with and without the group (setpriv), since root
# passes any permission check.  Bad values are usage errors (exit 2).

source "$(dirname "$0")/functions.sh"
requires stat setpriv getent nbdinfo

group=users
gid=$(getent group "$group" | cut -d: -f3) || skip "no group '$group'"
[ -n "$gid" ] || skip "no group '$group'"
nobody=65534
# The sockets live where the unprivileged user can reach them.
chmod 0711 "$tmp"
pub=$tmp/pub
mkdir -m 0755 "$pub"
disk=$tmp/disk.img
truncate -s 16M "$disk"

# as_user [GROUP-ID] CMD...: CMD as uid 65534, in GROUP-ID if given.
as_user()
{
    local groups=(--clear-groups)
    if [[ $1 =~ ^[0-9]+$ ]]; then
        groups=(--groups "$1")
        shift
    fi
    setpriv --reuid="$nobody" --regid="$nobody" "${groups[@]}" "$@"
}
# can_connect PATH [GROUP-ID]: the unprivileged user can connect to PATH.
can_connect()
{
    local path=$1
    shift
    as_user "$@" "$PYTHON" -c '
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])' "$path" 2>/dev/null
}
# mode_group PATH: "MODE GROUP" of PATH, e.g. "600 root".
mode_group() { stat -c '%a %G' "$1"; }

### Default: 0600, even with umask 000.
old_umask=$(umask)
umask 000
start_filterd --image "$disk" --format raw --socket "$pub/a.sock" --control "$pub/a.ctl"
umask "$old_umask"
[ "$(mode_group "$pub/a.sock")" = "600 root" ] || die "--socket: $(mode_group "$pub/a.sock"), expected 600 root"
[ "$(mode_group "$pub/a.ctl")" = "600 root" ] || die "--control: $(mode_group "$pub/a.ctl"), expected 600 root"
! can_connect "$pub/a.sock" "$gid" || die "another user could connect to a 0600 socket"
! can_connect "$pub/a.ctl" "$gid" || die "another user could connect to a 0600 control socket"
stop_filterd

### --socket-mode 0660 --socket-group users: the group may connect, others not.
start_filterd --image "$disk" --format raw --socket "$pub/b.sock" --control "$pub/b.ctl" \
    --socket-mode 0660 --socket-group "$group"
for s in "$pub/b.sock" "$pub/b.ctl"; do
    [ "$(mode_group "$s")" = "660 $group" ] || die "$s: $(mode_group "$s"), expected 660 $group"
    can_connect "$s" "$gid" || die "a member of $group cannot connect to $s"
    ! can_connect "$s" || die "a user outside $group could connect to $s"
done
# ... and is served: NBD works for the group member.
size=$(as_user "$gid" nbdinfo --size "nbd+unix:///?socket=$pub/b.sock") ||
    die "nbdinfo as a member of $group failed"
[ "$size" = 16777216 ] || die "nbdinfo as a member of $group: size $size"
stop_filterd

### A group given by number; mode 666 opens the socket to everyone.
start_filterd --image "$disk" --format raw --socket "$pub/c.sock" \
    --socket-mode 666 --socket-group "$gid"
[ "$(mode_group "$pub/c.sock")" = "666 $group" ] || die "$(mode_group "$pub/c.sock"), expected 666 $group"
can_connect "$pub/c.sock" || die "nobody cannot connect to a 0666 socket"
stop_filterd

### Usage errors.
d=("$CBT_FILTERD" --image "$disk" --format raw)
expect_rc 2 "${d[@]}" --socket "$pub/d.sock" --socket-mode 999
has "--socket-mode 999: expected permission bits in octal"
expect_rc 2 "${d[@]}" --socket "$pub/d.sock" --socket-mode 07777
has "--socket-mode 07777: expected permission bits in octal"
expect_rc 2 "${d[@]}" --socket "$pub/d.sock" --socket-group no-such-group-cbt
has "--socket-group no-such-group-cbt: no such group"
expect_rc 2 "${d[@]}" --listen "127.0.0.1:$(free_tcp_port)" --socket-mode 0660
has "--socket-mode and --socket-group need --socket or --control"
[ ! -e "$pub/d.sock" ] || die "a refused daemon created its socket"
exit 0
