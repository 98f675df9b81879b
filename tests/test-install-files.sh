#!/usr/bin/env bash
# `meson install` puts exactly the expected files in the expected places:
# the build directory under test is installed into a DESTDIR and the file
# list compared with the list below (a file missing, one too many, or one
# in the wrong directory fails), the programs must be executable and run
# from there, and a second, throwaway configuration with another --prefix
# must put every file under that prefix (meson introspect, no build).
#
# When a file is added to or removed from the install, update the list.

source "$(dirname "$0")/functions.sh"
requires meson jq diff find

dest=$tmp/dest

# option NAME [BUILDDIR]: a meson built-in or project option's value.
option()
{
    meson introspect "${2:-$CBT_BUILD_DIR}" --buildoptions |
        jq -r --arg n "$1" '.[] | select(.name == $n) | .value'
}

# under PREFIX DIR: DIR (a meson directory option) as an absolute path.
under()
{
    case $2 in
        /*) echo "$2" ;;
        *) echo "$1/$2" ;;
    esac
}

# expected_files PREFIX BUILDDIR: the installed files, one absolute path
# a line, sorted.
expected_files()
{
    local prefix=$1 b=$2 bindir mandir datadir unitdir
    bindir=$(under "$prefix" "$(option bindir "$b")")
    mandir=$(under "$prefix" "$(option mandir "$b")")
    datadir=$(under "$prefix" "$(option datadir "$b")")
    # -Dsystemdsystemunitdir, else systemd's directory under our prefix.
    unitdir=$(option systemdsystemunitdir "$b")
    unitdir=$(under "$prefix" "${unitdir:-lib/systemd/system}")
    sort <<EOF
$bindir/cbt
$bindir/cbt-filterd
$bindir/cbt-nightly.sh
$datadir/doc/cbt/examples/filterd.conf.example
$datadir/doc/cbt/examples/nightly.conf.example
$mandir/man1/cbt.1
$mandir/man5/cbt-bitmap.5
$mandir/man8/cbt-filterd.8
$unitdir/cbt-filterd-control@.socket
$unitdir/cbt-filterd@.service
$unitdir/cbt-filterd@.socket
$unitdir/cbt-nightly@.service
$unitdir/cbt-nightly@.timer
EOF
}

prefix=$(option prefix)
[ -n "$prefix" ] || die "cannot read the prefix of $CBT_BUILD_DIR"

if ! meson install -C "$CBT_BUILD_DIR" --destdir "$dest" --no-rebuild \
        >"$tmp/install.log" 2>&1; then
    cat "$tmp/install.log" >&2
    die "meson install -C $CBT_BUILD_DIR --destdir $dest failed"
fi

# Symbolic links count as files; directories do not.
(cd "$dest" && find . \( -type f -o -type l \) | sed 's|^\.||' | sort) >"$tmp/got"
expected_files "$prefix" "$CBT_BUILD_DIR" >"$tmp/want"
if ! diff -u "$tmp/want" "$tmp/got" >"$tmp/diff"; then
    cat "$tmp/diff" >&2
    die "installed files differ from the expected list (- missing, + unexpected)"
fi

bindir=$(under "$prefix" "$(option bindir)")
for p in cbt cbt-filterd cbt-nightly.sh; do
    [ -x "$dest$bindir/$p" ] || die "$bindir/$p is not executable"
done
# The installed programs run (no path into the build tree is needed).
expect_rc 0 "$dest$bindir/cbt-filterd" --help
has "--image"
expect_rc 0 "$dest$bindir/cbt" --help
has "Subcommands:"
expect_rc 2 "$dest$bindir/cbt-nightly.sh" --help
has "KEEP_CHAINS"
# The installed units and man pages name the installed programs and the
# configuration directory.
sysconfdir=$(under "$prefix" "$(option sysconfdir)")
unitdir=$(option systemdsystemunitdir)
unitdir=$(under "$prefix" "${unitdir:-lib/systemd/system}")
grep -qx "ExecStart=$bindir/cbt-filterd .*" "$dest$unitdir/cbt-filterd@.service" ||
    die "cbt-filterd@.service does not start $bindir/cbt-filterd"
grep -qx "EnvironmentFile=$sysconfdir/cbt/filterd/%i.conf" "$dest$unitdir/cbt-filterd@.service" ||
    die "cbt-filterd@.service does not read $sysconfdir/cbt/filterd/%i.conf"
grep -qx "ExecStart=$bindir/cbt-nightly.sh $sysconfdir/cbt/nightly/%i.conf" \
    "$dest$unitdir/cbt-nightly@.service" ||
    die "cbt-nightly@.service does not run $bindir/cbt-nightly.sh $sysconfdir/cbt/nightly/%i.conf"
mandir=$(under "$prefix" "$(option mandir)")
grep -qF "$bindir/cbt\\-nightly.sh" "$dest$mandir/man1/cbt.1" ||
    die "cbt.1 does not name $bindir/cbt-nightly.sh"

# Another prefix: every file goes under it, the units too (pkg-config
# systemd alone says /lib/systemd/system, whatever the prefix).  Only
# configured, not built: meson introspect --installed lists where each
# file would go.
other=/opt/cbt-install-test
if ! meson setup --prefix "$other" -Dtests=false "$tmp/b" "$CBT_SOURCE_DIR" \
        >"$tmp/setup.log" 2>&1; then
    cat "$tmp/setup.log" >&2
    die "meson setup --prefix $other failed"
fi
meson introspect "$tmp/b" --installed | jq -r '.[]' | sort >"$tmp/got2"
expected_files "$other" "$tmp/b" >"$tmp/want2"
if ! diff -u "$tmp/want2" "$tmp/got2" >"$tmp/diff2"; then
    cat "$tmp/diff2" >&2
    die "with --prefix $other the install plan differs from the expected list"
fi
grep -v "^$other/" "$tmp/got2" && die "files installed outside --prefix $other (above)"

exit 0
