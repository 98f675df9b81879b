#!/usr/bin/env bash
# The systemd units as installed (meson install into a DESTDIR):
#  - `systemd-analyze verify` accepts every one of them without a single
#    message: directives and values, the units they name (Requires=,
#    Sockets=, Service=), the executables of ExecStart= and the man pages
#    of Documentation=.  Filter: the units name the programs by their
#    final paths (PREFIX/bin/...), which do not exist on this machine, so
#    those paths are pointed into the DESTDIR first; MANPATH points at
#    the man pages there.
#  - the hardening stays: `systemd-analyze security --offline` rates both
#    services at most 3.0 ("OK"; without the sandboxing directives it says
#    9.6 "UNSAFE"), and
#  - the system call filter of cbt-filterd@.service allows what io_uring
#    needs (io_uring_setup, io_uring_enter, io_uring_register).
# Needs no systemd running (CI containers have none as PID 1).

source "$(dirname "$0")/functions.sh"
requires meson jq systemd-analyze

dest=$tmp/dest
if ! meson install -C "$CBT_BUILD_DIR" --destdir "$dest" --no-rebuild \
        >"$tmp/install.log" 2>&1; then
    cat "$tmp/install.log" >&2
    die "meson install -C $CBT_BUILD_DIR --destdir $dest failed"
fi
option()
{
    meson introspect "$CBT_BUILD_DIR" --buildoptions |
        jq -r --arg n "$1" '.[] | select(.name == $n) | .value'
}
prefix=$(option prefix)
bindir=$(option bindir)
mandir=$(option mandir)
[[ $bindir == /* ]] || bindir=$prefix/$bindir
[[ $mandir == /* ]] || mandir=$prefix/$mandir

service=$(cd "$dest" && find . -name 'cbt-filterd@.service' | sed 's|^\.||')
[ -n "$service" ] || die "meson install did not install cbt-filterd@.service"
unitdir=$(dirname "$service")
units=(cbt-filterd@.service cbt-filterd@.socket cbt-filterd-control@.socket
       cbt-nightly@.service cbt-nightly@.timer)
mkdir "$tmp/units"
for u in "${units[@]}"; do
    [ -f "$dest$unitdir/$u" ] || die "$unitdir/$u not installed"
    grep -q "$bindir/" "$dest$unitdir/$u" || [[ $u != *.service ]] ||
        die "$unitdir/$u does not name a program in $bindir"
    sed "s|$bindir/|$dest$bindir/|g" "$dest$unitdir/$u" >"$tmp/units/$u"
done

for u in "${units[@]}"; do
    rc=0
    out=$(cd "$tmp/units" && MANPATH=$dest$mandir SYSTEMD_LOG_COLOR=0 \
          systemd-analyze verify "$tmp/units/$u" 2>&1) || rc=$?
    if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
        echo "$out" >&2
        die "systemd-analyze verify $u: exit $rc (messages above)"
    fi
done

for u in cbt-filterd@.service cbt-nightly@.service; do
    rc=0
    out=$(SYSTEMD_LOG_COLOR=0 systemd-analyze security --offline=yes --threshold=30 \
          --no-pager "$tmp/units/$u" 2>&1) || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "$out" >&2
        die "$u: exposure above 3.0 (systemd-analyze security above)"
    fi
done

# SystemCallFilter=: the allowed sets (groups expanded) hold io_uring's
# calls and no deny list (~...) names them.
expand()
{
    local item
    for item in "$@"; do
        if [[ $item == @* ]]; then
            # shellcheck disable=SC2046
            expand $(systemd-analyze syscall-filter --no-pager "$item" 2>/dev/null |
                     sed -n 's/^    \([@a-z0-9_]*\)$/\1/p')
        else
            echo "$item"
        fi
    done
}
allow=() deny=()
while IFS= read -r line; do
    if [[ $line == '~'* ]]; then
        read -ra w <<<"${line#\~}"
        deny+=("${w[@]}")
    else
        read -ra w <<<"$line"
        allow+=("${w[@]}")
    fi
done < <(sed -n 's/^SystemCallFilter=//p' "$tmp/units/cbt-filterd@.service")
if [ "${#allow[@]}" -gt 0 ]; then
    allowed=$(expand "${allow[@]}" | sort -u)
    for call in io_uring_setup io_uring_enter io_uring_register; do
        grep -qx "$call" <<<"$allowed" ||
            die "SystemCallFilter=${allow[*]} of cbt-filterd@.service does not allow $call"
    done
fi
if [ "${#deny[@]}" -gt 0 ]; then
    denied=$(expand "${deny[@]}" | sort -u)
    for call in io_uring_setup io_uring_enter io_uring_register; do
        ! grep -qx "$call" <<<"$denied" ||
            die "SystemCallFilter=~${deny[*]} of cbt-filterd@.service denies $call"
    done
fi
exit 0
