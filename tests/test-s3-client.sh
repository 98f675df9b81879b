#!/usr/bin/env bash
# The S3 client (cbt/s3/s3*.c, driven through the hidden `cbt s3` command)
# against a real Ceph RADOS Gateway brought up by tests/ceph-rgw.sh:
#   - objects: put, get, head, ranged gets (inside, across and past the
#     end), delete, keys with spaces, '+', '%', '&', '<' and UTF-8;
#   - listings of more than 1000 keys (ListObjectsV2 continuation), in
#     pages of 1000 and of 100, by prefix and rolled up by delimiter;
#   - a 40 MiB multipart upload in 8 MiB parts with 4 in flight, read back
#     by parallel ranged gets (cmp); 13 MiB streamed from a pipe (size
#     unknown); a small object as one PUT;
#   - an upload left incomplete (as by a killed run): listed, invisible,
#     aborted with --all;
#   - path-style and virtual-host addressing;
#   - the lock object: acquire, conflict naming the holder, refresh,
#     release (by its owner only), takeover after expiry, and eight
#     acquirers racing for one lock: exactly one wins;
#   - errors: wrong secret key, unknown access key, missing bucket,
#     missing key: exit 1 naming the cause; radosgw down: exit 1 with
#     "Connection refused" after AWS_MAX_ATTEMPTS tries; radosgw back: the
#     data is all there.

source "$(dirname "$0")/functions.sh"
# shellcheck source=tests/ceph-rgw.sh
source "$testsdir/ceph-rgw.sh"
requires ceph-mon ceph-mgr ceph-osd radosgw radosgw-admin monmaptool osdmaptool \
    curl cmp

ceph_rgw_start "$tmp/ceph" || die "the Ceph cluster did not come up (see above)"
b=s3://cbt-test

s3() { cbt s3 "$@"; }

# expect_fail TEXT CMD...: CMD exits 1 and says TEXT.
expect_fail()
{
    local want=$1
    shift
    expect_rc 1 "$@"
    has "$want"
}

# ---- objects ------------------------------------------------------------

s3 mb $b || die "mb $b"
printf 'hello, object store\n' >"$tmp/small"
out=$(s3 put "$tmp/small" $b/dir/small) || die "put small"
# One PUT: a plain MD5 ETag, no "-N" of a multipart upload.
[ "$out" = "$(md5sum <"$tmp/small" | cut -d' ' -f1) dir/small" ] ||
    die "put small printed '$out'"
s3 get $b/dir/small "$tmp/small.back"
cmp "$tmp/small" "$tmp/small.back" || die "get small: bytes differ"
[ "$(s3 head $b/dir/small)" = "20 $(md5sum <"$tmp/small" | cut -d' ' -f1)" ] ||
    die "head small: $(s3 head $b/dir/small)"

# Ranges: inside, crossing the end (short), at and past the end (empty).
[ "$(s3 get --range 7:6 $b/dir/small -)" = "object" ] || die "range 7:6"
[ "$(s3 get --range 14:100 $b/dir/small - | od -An -c | tr -d ' ')" = 'store\n' ] ||
    die "range crossing the end"
[ -z "$(s3 get --range 20:5 $b/dir/small -)" ] || die "range at the end is not empty"
[ -z "$(s3 get --range 1000:5 $b/dir/small -)" ] || die "range past the end is not empty"

odd='odd dir/a b+c&d<é>%41.txt'
printf 'odd key\n' >"$tmp/odd"
s3 put "$tmp/odd" "$b/$odd" >/dev/null
s3 ls $b/odd | grep -qxF "8 $odd" || { s3 ls $b/odd >&2; die "ls does not show '$odd'"; }
[ "$(s3 get "$b/$odd" -)" = "odd key" ] || die "get '$odd'"
s3 rm "$b/$odd"
[ -z "$(s3 ls $b/odd)" ] || die "'$odd' still listed after rm"
# Deleting what is not there succeeds, as in S3.
s3 rm "$b/$odd"

# ---- listings past 1000 keys --------------------------------------------

mkdir "$tmp/many"
for (( i = 0; i < 1234; i++ )); do
    printf '%d\n' $i >"$tmp/many/k$(printf %05d $i)"
done
s3 put --jobs 8 "$tmp/many"/* $b/many/
(cd "$tmp/many" && for f in k*; do printf '%s many/%s\n' "$(stat -c %s "$f")" "$f"; done) \
    >"$tmp/many.want"
s3 ls $b/many/ >"$tmp/many.got"
diff "$tmp/many.want" "$tmp/many.got" >/dev/null ||
    die "ls of 1234 keys: $(diff "$tmp/many.want" "$tmp/many.got" | head -5)"
# The pages it took, from the requests --verbose reports: 2 of 1000, 13 of 100.
[ "$(cbt -v s3 ls $b/many/ 2>&1 >/dev/null | grep -c 'S3 LIST .*: HTTP 200')" = 2 ] ||
    die "ls in pages of 1000 did not take 2 requests"
cbt -v s3 ls --page-size 100 $b/many/ 2>"$tmp/pages.err" >"$tmp/many.got100"
[ "$(grep -c 'S3 LIST .*: HTTP 200' "$tmp/pages.err")" = 13 ] || die "ls in pages of 100: not 13 requests"
cmp "$tmp/many.want" "$tmp/many.got100" || die "ls in pages of 100 differs"
[ "$(s3 ls $b/many/k0123)" = "5 many/k01230
5 many/k01231
5 many/k01232
5 many/k01233" ] || die "ls by prefix: $(s3 ls $b/many/k0123)"
[ "$(s3 ls -d / $b/)" = "PRE dir/
PRE many/" ] || die "ls rolled up by '/': $(s3 ls -d / $b/)"

# ---- multipart ----------------------------------------------------------

head -c $((40 << 20)) /dev/urandom >"$tmp/big"
out=$(s3 put --part-size 8M --jobs 4 "$tmp/big" $b/big)
# The ETag of a multipart object ends in "-PARTS".
[[ $out == *-5\ big ]] || die "40 MiB in 8 MiB parts: ETag '$out' is not of 5 parts"
[ "$(s3 head $b/big)" = "$((40 << 20)) ${out% big}" ] || die "head big: $(s3 head $b/big)"
s3 get --jobs 4 --chunk 3M $b/big "$tmp/big.back"
cmp "$tmp/big" "$tmp/big.back" || die "40 MiB multipart object read back differs"
# Through stdout, in order.
s3 get --chunk 5M $b/big - | cmp - "$tmp/big" || die "get big to stdout differs"

# From a pipe: the size is unknown until the end.
head -c $((13 << 20)) "$tmp/big" | s3 put --part-size 5M - $b/piped >"$tmp/piped.out"
grep -q -- '-3 piped$' "$tmp/piped.out" || die "13 MiB from a pipe: $(cat "$tmp/piped.out")"
s3 get $b/piped - | cmp - <(head -c $((13 << 20)) "$tmp/big") || die "piped object differs"

# An upload a killed run left behind: listed, not visible, aborted.
out=$(s3 put --no-complete --part-size 5M "$tmp/big" $b/left/over)
id=${out% left/over}
[ "$(s3 uploads $b/left/)" = "$id left/over" ] || die "uploads: $(s3 uploads $b/left/)"
[ -z "$(s3 ls $b/left/)" ] || die "an incomplete upload is visible"
expect_fail "not found (NoSuchKey)" s3 get $b/left/over -
s3 abort --all $b/left/
[ -z "$(s3 uploads $b/)" ] || die "uploads left after abort --all: $(s3 uploads $b/)"
# Aborting it again: nothing left to do, and not an error.
s3 abort $b/left/over "$id"

# ---- addressing ---------------------------------------------------------

port=${AWS_ENDPOINT_URL##*:}
want="20 $(md5sum <"$tmp/small" | cut -d' ' -f1)"
[ "$(s3 head --path-style $b/dir/small)" = "$want" ] || die "path-style addressing"
# radosgw's dns name is localhost: BUCKET.localhost is virtual-host style.
[ "$(s3 head --virtual-host --endpoint "http://localhost:$port" $b/dir/small)" = "$want" ] ||
    die "virtual-host addressing"
[ "$(CBT_S3_ADDRESSING_STYLE=virtual s3 ls --endpoint "http://localhost:$port" $b/dir/)" = \
  "20 dir/small" ] || die "CBT_S3_ADDRESSING_STYLE=virtual"
expect_rc 2 s3 ls --path-style --virtual-host $b/

# ---- lock ---------------------------------------------------------------

lock=$b/repo/lock
token=$(s3 lock-acquire --ttl 600 --note "test-s3-client" $lock)
[ -n "$token" ] || die "lock-acquire printed no token"
expect_fail "held by $(uname -n) pid" s3 lock-acquire $lock
has "(test-s3-client)"
s3 lock-refresh $lock "$token"
expect_fail "S3 lock $lock: held by" s3 lock-release $lock not-the-token
s3 lock-release $lock "$token"
[ -z "$(s3 ls $b/repo/)" ] || die "lock object left after release"
expect_fail "not found" s3 lock-refresh $lock "$token"

# Expiry is the server's clock: ttl 1, then the lock is taken over.
old=$(s3 lock-acquire --ttl 1 $lock)
sleep 2.5
new=$(s3 lock-acquire --ttl 600 $lock 2>"$tmp/takeover.err")
grep -q "took over an expired lock" "$tmp/takeover.err" || die "no takeover message"
[ "$new" != "$old" ] || die "takeover kept the old token"
expect_fail "held by" s3 lock-refresh $lock "$old"
s3 lock-release $lock "$new"

# Eight at once: one wins, seven are told who holds it.
pids=()
for i in 1 2 3 4 5 6 7 8; do
    "$CBT_CLI" s3 lock-acquire $b/race/lock >"$tmp/race.$i.out" 2>"$tmp/race.$i.err" &
    pids+=($!)
done
wins=0
for i in 1 2 3 4 5 6 7 8; do
    if wait "${pids[i - 1]}"; then
        wins=$((wins + 1))
    else
        grep -q "held by" "$tmp/race.$i.err" || die "racer $i: $(cat "$tmp/race.$i.err")"
    fi
done
[ $wins -eq 1 ] || die "$wins of 8 racers took the lock"

# ---- errors -------------------------------------------------------------

expect_fail "access denied (SignatureDoesNotMatch)" \
    env AWS_SECRET_ACCESS_KEY=not-the-secret "$CBT_CLI" s3 ls $b/
has "AWS_SECRET_ACCESS_KEY"
expect_fail "access denied (InvalidAccessKeyId)" \
    env AWS_ACCESS_KEY_ID=NOSUCHKEY "$CBT_CLI" s3 get $b/dir/small -
expect_fail "no such bucket (NoSuchBucket)" s3 ls s3://no-such-bucket/
expect_fail "S3 GET $b/nothing/here: not found (NoSuchKey)" s3 get $b/nothing/here -
expect_fail "no credentials" env -u AWS_ACCESS_KEY_ID "$CBT_CLI" s3 ls $b/

# The endpoint down: refused connections, a bounded number of tries.
ceph_rgw_stop_rgw "$CEPH_RGW_DIR"
expect_fail "cannot connect to $AWS_ENDPOINT_URL: Connection refused" \
    env AWS_MAX_ATTEMPTS=3 "$CBT_CLI" s3 ls $b/
has "gave up after 3 tries"
[ "$(grep -c "try [23] of 3" <<<"$out")" = 2 ] || { echo "$out" >&2; die "not 3 tries"; }
expect_fail "Connection refused" env AWS_MAX_ATTEMPTS=1 "$CBT_CLI" s3 put "$tmp/small" $b/x
# And back: everything is still there.
ceph_rgw_start_rgw "$CEPH_RGW_DIR" || die "radosgw did not come back"
s3 get $b/big "$tmp/big.again"
cmp "$tmp/big" "$tmp/big.again" || die "40 MiB object differs after the radosgw restart"
[ "$(s3 ls $b/many/ | wc -l)" = 1234 ] || die "keys lost across the radosgw restart"
