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
#   CBT_REPO          repository directory or s3://BUCKET/PREFIX (required)
#   CBT_CONTROL       the daemon's control socket (required)
#   CBT_SOCKET        the daemon's NBD unix socket, or
#   CBT_URI           an NBD URI
#   KEEP_CHAINS       chains to keep, >= 1 (default 7)
#   CBT_LOG           log file (default /var/log/cbt-nightly.log)
#   CBT               the cbt binary (default: cbt on $PATH)
#   CBT_BACKUP_ARGS   extra arguments for cbt backup (e.g. --full, --connections 8)
#   CBT_S3_ENDPOINT   S3 server of an s3:// repository (else AWS_ENDPOINT_URL;
#                     credentials from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)
#   CBT_NIGHTLY_LOCK  the one-run-at-a-time lock file of an s3:// repository
#                     (default /tmp/cbt-nightly-HASH.lock; a directory's is
#                     REPO/.nightly.lock)
#
# Every line is logged with a UTC timestamp; cbt's own messages are logged
# too.  Exit status: that of `cbt backup` (0 ok, 1 failed, 3 incremental
# impossible with --incremental, ...: see cbt --help); 1 if pruning failed
# after a good backup; 2 for a configuration error; 1 if another run holds
# the lock.
#
# Locking: this script holds REPO/.nightly.lock (for an s3:// repository
# CBT_NIGHTLY_LOCK on this host) for its whole run (one nightly per
# repository).  Pruning is `cbt prune --keep-chains KEEP_CHAINS`, which
# takes the repository's own lock (REPO/.lock, the lock cbt
# backup/restore/verify take, or the S3 lock object PREFIX/lock), so no
# backup writes and no restore of a directory reads the repository while
# chains are deleted; if another holds it, pruning is skipped this time.
# cbt prune rewrites the manifest first (atomically) and deletes the files
# after: a crash in between leaves unlisted files, never a manifest naming
# missing ones.

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
s3opt=()
[ -z "${CBT_S3_ENDPOINT:-}" ] || s3opt=(--s3-endpoint "$CBT_S3_ENDPOINT")
case "$CBT_REPO" in
s3://*|S3://*)
    is_s3=1
    : "${CBT_NIGHTLY_LOCK:=${TMPDIR:-/tmp}/cbt-nightly-$(printf %s "$CBT_REPO" | sha256sum | cut -c1-16).lock}"
    ;;
*)
    is_s3=
    mkdir -p "$CBT_REPO" || { log "cannot create $CBT_REPO"; exit 1; }
    CBT_NIGHTLY_LOCK=$CBT_REPO/.nightly.lock
    ;;
esac

exec 9>>"$CBT_NIGHTLY_LOCK" || { log "cannot open $CBT_NIGHTLY_LOCK"; exit 1; }
if ! flock -n 9; then
    log "another cbt-nightly is running on $CBT_REPO (lock $CBT_NIGHTLY_LOCK): exiting"
    exit 1
fi

log "backup of $CBT_REPO starting"
# shellcheck disable=SC2086
"$CBT" backup "${nbd[@]}" --control "$CBT_CONTROL" --repo "$CBT_REPO" "${s3opt[@]}" \
    $CBT_BACKUP_ARGS 2>&1 | log_lines
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
    log "backup FAILED with exit status $status; nothing pruned"
    exit "$status"
fi

# prune: delete the oldest chains beyond KEEP_CHAINS (cbt prune, under the
# repository's lock).
prune()
{
    local out err status=0 chains drop f lockname
    err=$(mktemp "${TMPDIR:-/tmp}/cbt-nightly.XXXXXX") || return 1
    out=$("$CBT" prune --repo "$CBT_REPO" "${s3opt[@]}" --keep-chains "$KEEP_CHAINS" \
          --json 2>"$err") || status=$?
    if [ "$status" -ne 0 ]; then
        if grep -qE 'is locked by|: held by' "$err"; then
            if [ -n "$is_s3" ]; then lockname="lock object $CBT_REPO/lock"
            else lockname="lock $CBT_REPO/.lock"; fi
            log "repository is busy ($lockname held): pruning skipped this time"
            log_lines <"$err"
            rm -f "$err"
            return 0
        fi
        log_lines <"$err"
        rm -f "$err"
        log "cbt prune failed with exit status $status"
        return 1
    fi
    log_lines <"$err"
    rm -f "$err"
    chains=$(jq '.chains' <<<"$out")
    drop=$(jq '."pruned-chains"' <<<"$out")
    if [ "$drop" -le 0 ]; then
        log "$chains chains, keeping up to $KEEP_CHAINS: nothing to prune"
        return 0
    fi
    for f in $(jq -r '.files[]' <<<"$out"); do
        log "pruned $f"
    done
    log "pruned $drop of $chains chains (KEEP_CHAINS=$KEEP_CHAINS)"
}

if ! prune; then
    log "backup OK, but pruning FAILED"
    exit 1
fi
log "backup of $CBT_REPO finished"
exit 0
