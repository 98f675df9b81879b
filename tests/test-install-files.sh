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
    local prefix=$1 b=$2 bindir mandir
    bindir=$(under "$prefix" "$(option bindir "$b")")
    mandir=$(under "$prefix" "$(option mandir "$b")")
    sort <<EOF
$bindir/cbt
$bindir/cbt-filterd
$bindir/cbt-nightly.sh
$mandir/man1/cbt.1
$mandir/man5/cbt-bitmap.5
$mandir/man8/cbt-filterd.8
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
# The installed man pages name the installed programs.
mandir=$(under "$prefix" "$(option mandir)")
grep -qF "$bindir/cbt\\-nightly.sh" "$dest$mandir/man1/cbt.1" ||
    die "cbt.1 does not name $bindir/cbt-nightly.sh"

# Another prefix: every file goes under it.  Only configured, not built:
# meson introspect --installed lists where each file would go.
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
