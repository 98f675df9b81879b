#!/usr/bin/env bash
# The man pages document exactly the options the programs take: every
# option line of `cbt-filterd --help` is an item of OPTIONS in
# cbt-filterd(8), and every option line of `cbt --help` and of
# `cbt SUBCOMMAND --help` (for each subcommand `cbt --help` lists, and
# each of `cbt bitmap`'s) is an item of cbt(1), under OPTIONS or under the
# heading "cbt SUBCOMMAND" -- with the same short option and the same
# argument name -- and no page documents an option or a subcommand the
# program does not have.  A new option without its man page entry, or a
# removed one left in the page, fails here with the list of differences.
#
# The pages are compared as a reader sees them: rendered by groff (the
# formatter man uses), so any markup that renders the same is fine.

source "$(dirname "$0")/functions.sh"
requires groff
[ -x "$CBT_CLI" ] || die "cbt CLI $CBT_CLI not found (build it: ninja -C build)"
[ -x "$CBT_FILTERD" ] || die "$CBT_FILTERD not found (build it: ninja -C build)"

man=$CBT_BUILD_DIR/man
for p in cbt-filterd.8 cbt.1; do
    [ -f "$man/$p" ] || die "$man/$p not built (ninja -C $CBT_BUILD_DIR)"
    # -rLL: no line breaks inside an item's tag; -rHY=0: no hyphenation.
    LC_ALL=C groff -man -Tascii -P-cbou -rLL=250n -rHY=0 "$man/$p" >"$tmp/$p.txt" ||
        die "groff cannot render $man/$p"
done

"$PYTHON" - "$tmp" "$CBT_FILTERD" "$CBT_CLI" <<'PYEOF'
import os, re, subprocess, sys

tmp, filterd, cli = sys.argv[1:4]
# "  -i, --image=PATH   text" or "  --cache=MODE   text" in --help;
# the same at the start of an item's tag (7 columns in) in a man page.
OPT = r"(?:(-[A-Za-z0-9]), )?(--[A-Za-z0-9][A-Za-z0-9-]*)(?:=(\S+))?(?:\s|$)"
HELP_RE = re.compile(r"^\s+" + OPT)
TAG_RE = re.compile(r"^ {7}" + OPT)
env = dict(os.environ, LC_ALL="C")

def show(opt):
    short, long, arg = opt
    return (short + ", " if short else "") + long + ("=" + arg if arg else "")

def help_text(argv):
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    out = r.stdout + r.stderr
    if r.returncode not in (0, 2) or not out.strip():
        sys.exit("%s: exit %d, no help\n%s" % (" ".join(argv), r.returncode, out))
    return out

def help_options(text):
    return {m.groups() for m in map(HELP_RE.match, text.splitlines()) if m}

def man_sections(path):
    """{heading: set of options}; .SH headings start in column 0, .SS
    headings 3 columns in; a .SS section's key is "SH/SS"."""
    secs, sh, key, prev = {}, None, None, ""
    for line in open(path):
        line = line.rstrip("\n")
        if re.match(r"^[A-Z]", line):
            sh = key = line.strip()
            line = ""
        elif re.match(r"^ {3}\S", line):
            key = sh + "/" + line.strip()
            line = ""
        elif key:
            # An item's tag follows a blank line or a heading; a line of a
            # paragraph that happens to begin with an option does not.
            m = TAG_RE.match(line)
            if m and not prev.strip():
                secs.setdefault(key, set()).add(m.groups())
        if key:
            secs.setdefault(key, set())
        prev = line
    return secs

problems = []

def compare(what, helped, documented, page_own, page):
    for o in sorted(helped - documented, key=show):
        problems.append("%s: %s is in --help but not in %s" % (what, show(o), page))
    for o in sorted(page_own - helped, key=show):
        problems.append("%s: %s is in %s but not in --help" % (what, show(o), page))

# cbt-filterd(8): OPTIONS holds every option, nothing else has any.
secs = man_sections(os.path.join(tmp, "cbt-filterd.8.txt"))
fd_help = help_options(help_text([filterd, "--help"]))
if len(fd_help) < 10:
    sys.exit("cbt-filterd --help: found only %d options; the parser is broken" % len(fd_help))
page_opts = secs.get("OPTIONS", set())
compare("cbt-filterd", fd_help, page_opts, page_opts, "cbt-filterd(8) OPTIONS")
for k, v in secs.items():
    if k != "OPTIONS" and v:
        problems.append("cbt-filterd(8): options listed under %s, not OPTIONS: %s"
                        % (k, ", ".join(map(show, sorted(v, key=show)))))

# cbt(1): global options under OPTIONS, each subcommand's under
# COMMANDS/cbt SUBCOMMAND; a subcommand's --quiet, --help ... may be the
# global ones.
secs = man_sections(os.path.join(tmp, "cbt.1.txt"))
glob = secs.get("OPTIONS", set())
text = help_text([cli, "--help"])
compare("cbt", help_options(text), glob, glob, "cbt(1) OPTIONS")
m = re.search(r"^Subcommands:\n((?:  \S.*\n)+)", text, re.M)
if not m:
    sys.exit("cbt --help: no Subcommands: list")
todo = [[l.split()[0]] for l in m.group(1).splitlines()]
seen = set()
while todo:
    cmd = todo.pop(0)
    name = " ".join(cmd)
    text = help_text([cli] + cmd + ["--help"])
    opts = help_options(text)
    subs = sorted(set(re.findall(r"^\s+cbt %s ([a-z][a-z-]*)\b" % re.escape(name),
                                 text, re.M)))
    if subs and not opts - glob:
        # "cbt bitmap": a group of subcommands, each with its own options.
        todo += [cmd + [s] for s in subs]
        continue
    key = "COMMANDS/cbt " + name
    seen.add(key)
    if key not in secs:
        problems.append("cbt %s: no section \"cbt %s\" under COMMANDS in cbt(1)" % (name, name))
        continue
    compare("cbt " + name, opts, secs[key] | glob, secs[key], "cbt(1) \"cbt %s\"" % name)
if len(seen) < 5:
    sys.exit("found only %d cbt subcommands (%s); the parser is broken"
             % (len(seen), ", ".join(sorted(seen))))
for k in secs:
    if k.startswith("COMMANDS/") and k not in seen:
        problems.append("cbt(1): section \"%s\" documents no subcommand cbt has"
                        % k.split("/", 1)[1])
    elif "/" not in k and k != "OPTIONS" and secs[k]:
        problems.append("cbt(1): options listed under %s" % k)

if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit("%d differences between the man pages and --help" % len(problems))
PYEOF
