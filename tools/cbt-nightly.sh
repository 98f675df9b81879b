#!/usr/bin/env bash
# cbt-nightly.sh: a sample cron job for cbt backups.
#
#   # /etc/cron.d/cbt:  30 2 * * *  root  /usr/local/bin/cbt-nightly.sh /etc/cbt/vm1.conf
#
# It takes a backup (`cbt backup --auto`: incremental when the daemon's
# bitmap continues the repository, full otherwise), then keeps the newest
# KEEP_CHAINS chains (a chain is a full backup and the incrementals on top
# of it) and deletes older chains whole.  The newest chain is never
# touched, and nothing is pruned after a failed backup.
#
# Configuration: environment variables, or a file of VAR=value lines given
# as the only argument (it is sourced).
#   CBT_REPO          repository directory (required)
#   CBT_CONTROL       the daemon's control socket (required)
#   CBT_SOCKET        the daemon's NBD unix socket, or
#   CBT_URI           an NBD URI
#   KEEP_CHAINS       chains to keep, >= 1 (default 7)
#   CBT_LOG           log file (default /var/log/cbt-nightly.log)
#   CBT               the cbt binary (default: cbt on $PATH)
#   CBT_BACKUP_ARGS   extra arguments for cbt backup (e.g. --full, --connections 8)
#
# Every line is logged with a UTC timestamp; cbt's own messages are logged
# too.  Exit status: that of `cbt backup` (0 ok, 1 failed, 3 incremental
# impossible with --incremental, ...: see cbt --help); 1 if pruning failed
# after a good backup; 2 for a configuration error; 1 if another run holds
# the lock.
#
# Locking: this script holds REPO/.nightly.lock for its whole run (one
# nightly per repository).  While pruning it also holds REPO/.lock, the
# lock cbt backup/restore/verify take, so no backup writes and no restore
# reads the repository while chains are deleted.  Pruning rewrites
# manifest.json first (temp file, sync, rename, sync of the directory) and
# deletes the files after: a crash in between leaves unlisted files, never
# a manifest naming missing ones.

set -uo pipefail

if [ $# -gt 1 ] || [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
    exit 2
fi
if [ $# -eq 1 ]; then
    # shellcheck disable=SC1090
    source "$1" || { echo "cbt-nightly: cannot read $1" >&2; exit 2; }
fi

: "${KEEP_CHAINS:=7}"
: "${CBT_LOG:=/var/log/cbt-nightly.log}"
: "${CBT:=cbt}"
: "${CBT_BACKUP_ARGS:=}"

log()
{
    local line
    for line in "$@"; do
        printf '%s cbt-nightly[%d]: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" $$ "$line" >>"$CBT_LOG"
    done
}
# Log each line of standard input.
log_lines() { local l; while IFS= read -r l; do log "$l"; done; }
config_error()
{
    echo "cbt-nightly: $*" >&2
    log "configuration error: $*" 2>/dev/null || true
    exit 2
}

[ -n "${CBT_REPO:-}" ] || config_error "CBT_REPO is not set"
[ -n "${CBT_CONTROL:-}" ] || config_error "CBT_CONTROL is not set"
if [ -n "${CBT_SOCKET:-}" ] && [ -z "${CBT_URI:-}" ]; then
    nbd=(--socket "$CBT_SOCKET")
elif [ -n "${CBT_URI:-}" ] && [ -z "${CBT_SOCKET:-}" ]; then
    nbd=(--uri "$CBT_URI")
else
    config_error "set exactly one of CBT_SOCKET and CBT_URI"
fi
[[ "$KEEP_CHAINS" =~ ^[1-9][0-9]*$ ]] || config_error "KEEP_CHAINS must be a number >= 1, not '$KEEP_CHAINS'"
command -v jq >/dev/null || config_error "jq is required for pruning"
touch "$CBT_LOG" 2>/dev/null || { echo "cbt-nightly: cannot write $CBT_LOG" >&2; exit 2; }
mkdir -p "$CBT_REPO" || { log "cannot create $CBT_REPO"; exit 1; }

exec 9>>"$CBT_REPO/.nightly.lock"
if ! flock -n 9; then
    log "another cbt-nightly is running on $CBT_REPO (lock $CBT_REPO/.nightly.lock): exiting"
    exit 1
fi

log "backup of $CBT_REPO starting"
# shellcheck disable=SC2086
"$CBT" backup "${nbd[@]}" --control "$CBT_CONTROL" --repo "$CBT_REPO" \
    $CBT_BACKUP_ARGS 2>&1 | log_lines
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
    log "backup FAILED with exit status $status; nothing pruned"
    exit "$status"
fi

# prune: delete the oldest chains beyond KEEP_CHAINS.  Runs under REPO/.lock.
prune()
{
    local list chains drop files manifest tmpm f
    exec 8>>"$CBT_REPO/.lock"
    if ! flock -n 8; then
        log "repository is busy (lock $CBT_REPO/.lock held): pruning skipped this time"
        return 0
    fi
    echo $$ >"$CBT_REPO/.lock"
    list=$("$CBT" list --repo "$CBT_REPO" --json 2> >(log_lines)) || {
        log "cbt list failed: cannot prune"
        return 1
    }
    chains=$(jq '.chains' <<<"$list")
    drop=$((chains - KEEP_CHAINS))
    if [ "$drop" -le 0 ]; then
        log "$chains chains, keeping up to $KEEP_CHAINS: nothing to prune"
        return 0
    fi
    # The files of chains 1..drop; the newest chain has number $chains > drop.
    files=$(jq -c --argjson d "$drop" '[.backups[] | select(.chain <= $d) | .file]' <<<"$list")
    manifest=$CBT_REPO/manifest.json
    tmpm=$(mktemp "$manifest.XXXXXX") || return 1
    if ! jq --argjson drop "$files" \
        '.backups |= map(select(.file as $f | $drop | index($f) | not))' \
        "$manifest" >"$tmpm" || ! sync "$tmpm" || ! mv "$tmpm" "$manifest" ||
       ! sync "$CBT_REPO"; then
        rm -f "$tmpm"
        log "cannot rewrite $manifest: nothing pruned"
        return 1
    fi
    for f in $(jq -r '.[]' <<<"$files"); do
        rm -f "$CBT_REPO/$f" || { log "cannot remove $CBT_REPO/$f"; return 1; }
        log "pruned $f"
    done
    log "pruned $drop of $chains chains (KEEP_CHAINS=$KEEP_CHAINS)"
    : >"$CBT_REPO/.lock"
    flock -u 8
}

if ! prune; then
    log "backup OK, but pruning FAILED"
    exit 1
fi
log "backup of $CBT_REPO finished"
exit 0
