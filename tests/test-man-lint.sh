#!/usr/bin/env bash
# The man pages build and read cleanly: each one renders with groff (the
# formatter man uses) without a single warning (-ww: undefined macros,
# bad escapes, missing arguments ...), its .TH names the page and the
# section its file name says, whatis can parse its NAME line (lexgrog,
# what mandb indexes), and `man -l` renders it as a user would.
# The option lists are test-man-options' business.

source "$(dirname "$0")/functions.sh"
requires groff lexgrog man

man=$CBT_BUILD_DIR/man
n=0
for page in cbt.1 cbt-bitmap.5 cbt-filterd.8; do
    f=$man/$page
    [ -f "$f" ] || die "$f not built (ninja -C $CBT_BUILD_DIR)"
    name=${page%.*} section=${page##*.}
    grep -q '@[A-Z_]*@' "$f" && die "$f: a @VARIABLE@ was not substituted"
    # .TH CBT-FILTERD 8 ...: the title is the name in capitals.
    th=$(grep -m1 '^\.TH ' "$f")
    read -r _ title sec _ <<<"$th"
    [ "$title" = "${name^^}" ] && [ "$sec" = "$section" ] ||
        die "$f: '$th' should name ${name^^} section $section"
    warnings=$(LC_ALL=C groff -man -ww -z "$f" 2>&1)
    [ -z "$warnings" ] || { echo "$warnings" >&2; die "$f: groff warns (above)"; }
    expect_rc 0 lexgrog "$f"
    has "$name - "
    out=$(LC_ALL=C MANWIDTH=80 man -l "$f" 2>&1 | col -b)
    has "SEE ALSO"
    n=$((n + 1))
done
[ "$n" -eq 3 ] || die "checked $n pages, expected 3"
