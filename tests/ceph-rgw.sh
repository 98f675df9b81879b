# A throwaway one-node Ceph cluster with a RADOS Gateway: a real S3
# server for the tests of cbt's S3 client and repositories.
#
# Usage, by hand:
#   bash tests/ceph-rgw.sh start DIR     bring it up in DIR (created, must
#                                        be empty or absent); prints and
#                                        writes DIR/env
#   bash tests/ceph-rgw.sh stop DIR      SIGKILL every daemon of DIR
#   bash tests/ceph-rgw.sh stop-rgw DIR  SIGKILL only radosgw
#   bash tests/ceph-rgw.sh start-rgw DIR start radosgw again (same port)
# or from a test, after sourcing tests/functions.sh:
#   source "$testsdir/ceph-rgw.sh"
#   ceph_rgw_start "$tmp/ceph"   (registers ceph_rgw_stop with cleanup_fn
#                                 and exports the AWS_* variables)
#
# What it builds: mon.a + mgr.x + osd.0 + client.rgw, one process each,
# started in the foreground (-f) in the background of this shell, so their
# PIDs are known at once and stop never depends on a pid file the daemon
# might not have written.  Everything lives in DIR: ceph.conf, the one
# keyring that holds every key (the mon's initial keyring, so no daemon
# needs an auth round trip to be created), the mon store, the OSD's
# objectstore, admin sockets, pid files, logs, and DIR/pids (one
# "NAME PID" line per daemon).  Nothing is read from /etc/ceph or written
# to /var/lib/ceph or /var/log/ceph, and nothing needs systemd, so two
# clusters in two directories run side by side: each has its own fsid and
# its own ports.
#
# The settings that make one node start in seconds (issue 15):
#   - osd pool default size = 1, mon allow pool size one: one OSD is a
#     complete cluster;
#   - 8 PGs per pool with the autoscaler off: few PGs to create and peer
#     for the seven pools radosgw makes, far below mon_max_pg_per_osd
#     (at the defaults radosgw's pool creation fails on one OSD);
#   - paxos propose interval = paxos min wait = 0.01: every pool radosgw
#     creates is a map change, ~2 s each at the defaults;
#   - the first maps are made offline (monmaptool, osdmaptool, ceph-mon
#     --mkfs --osdmap) with osd.0 in them, so no `ceph osd new` through
#     the slow python CLI; radosgw starts once the OSD is up (a pool
#     created with no OSD up gets its PGs only at a later mon tick);
#   - rgw dns name = localhost: http://BUCKET.localhost:PORT/ is
#     virtual-host addressing (curl resolves *.localhost to 127.0.0.1
#     itself), while http://127.0.0.1:PORT/BUCKET stays path style;
#   - memstore by default (CEPH_RGW_STORE=bluestore puts bluestore on a
#     sparse file DIR/osd.0.block of CEPH_RGW_SIZE, for data larger than
#     memory).
#
# Ports: the mon's and radosgw's are picked at random below the kernel's
# ephemeral range (which outgoing connections, including the daemons'
# own, draw from) and checked free; a daemon that still loses its port
# to a concurrent cluster fails to start, and start tries again with new
# ports (3 attempts).  The OSD and mgr bind in Ceph's own 6800-7300 range,
# trying the next port when one is taken.
#
# Teardown is SIGKILL by PID (SIGTERM costs ~2 s per daemon and the data
# is thrown away anyway).  stop waits until each PID is gone.
#
# Environment: CEPH_RGW_STORE (memstore|bluestore), CEPH_RGW_SIZE (bytes
# of the OSD, default 4 GiB), CEPH_RGW_VERBOSE=1 (timings on stderr).

# Shell options are the caller's when sourced; by hand they are set in the
# dispatch at the bottom.

_ceph_rgw_log()
{
    if [ -n "${CEPH_RGW_VERBOSE:-}" ]; then
        printf 'ceph-rgw: %s: %s\n' "$(date +%T.%N | cut -c1-12)" "$*" >&2
    fi
}

# _ceph_rgw_ports N: print N distinct TCP ports on 127.0.0.1 that nothing
# listens on now, below the ephemeral range.
_ceph_rgw_ports()
{
    /usr/bin/python3 - "$1" <<'PYEOF'
import random, socket, sys
lo = 10000
try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        hi = int(f.read().split()[0])
except OSError:
    hi = 32768
hi = max(hi, lo + 1000)
got = []
while len(got) < int(sys.argv[1]):
    p = random.randrange(lo, hi)
    # 6800-7300 is where the OSD and mgr bind.
    if p in got or 6700 <= p <= 7400:
        continue
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        s.close()
    got.append(p)
print(" ".join(map(str, got)))
PYEOF
}

# _ceph_rgw_daemon DIR NAME CMD...: start CMD in the background with its
# output in DIR/log/NAME.out and record "NAME PID" in DIR/pids.
_ceph_rgw_daemon()
{
    local dir=$1 name=$2
    shift 2
    # setsid: a terminal's ^C to a by-hand start must not reach the cluster.
    setsid "$@" </dev/null >>"$dir/log/$name.out" 2>&1 &
    echo "$name $!" >>"$dir/pids"
    _ceph_rgw_log "started $name (pid $!)"
    # Not a job of this shell: no "Killed" notice when stop kills it.
    disown $!
}

# _ceph_rgw_running DIR PID: PID is a live daemon of DIR: it has a /proc
# entry, is not a zombie (a container's init may never reap one), and its
# command line still names DIR/ceph.conf (so a stale pids file never
# matches a process that reused the number).
_ceph_rgw_running()
{
    local state
    # The state follows the ")" that ends the command name.
    state=$(sed 's/.*) //' "/proc/$2/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ -n "$state" ] && [ "$state" != Z ] || return 1
    tr '\0' ' ' 2>/dev/null <"/proc/$2/cmdline" | grep -qF -- "-c $1/ceph.conf "
}

# _ceph_rgw_alive DIR NAME: the daemon NAME of DIR (its latest start) runs.
_ceph_rgw_alive()
{
    local p
    p=$(awk -v n="$2" '$1 == n { p = $2 } END { print p }' "$1/pids" 2>/dev/null)
    [ -n "$p" ] && _ceph_rgw_running "$1" "$p"
}

# _ceph_rgw_conf DIR MONPORT RGWPORT: write DIR/ceph.conf.
_ceph_rgw_conf()
{
    local dir=$1 monport=$2 rgwport=$3 fsid store size
    fsid=$(cat /proc/sys/kernel/random/uuid)
    store=${CEPH_RGW_STORE:-memstore}
    size=${CEPH_RGW_SIZE:-4294967296}
    cat >"$dir/ceph.conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$monport]
public addr = 127.0.0.1
public network = 127.0.0.1/32
ms bind msgr1 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $dir/keyring
run dir = $dir/run
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
log to stderr = false
err to stderr = true
mon cluster log file = $dir/log/cluster.log
crash dir = $dir/crash
debug ms = 0/0
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail crit = 1
mon data avail warn = 2
paxos propose interval = 0.01
paxos min wait = 0.01
mon data = $dir/\$name
mgr data = $dir/\$name
osd data = $dir/\$name
rgw data = $dir/\$name

[mon]
mon initial members = a

[mgr]
mgr initial modules =
mgr module path = $dir/mgr-modules

[osd]
osd objectstore = $store
memstore device bytes = $size
bluestore block path = $dir/\$name.block
bluestore block create = true
bluestore block size = $size
bluestore fsck on mkfs = false
bluestore fsck on mount = false
bluestore cache size = 134217728
osd memory target = 939524096

[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:$rgwport
rgw thread pool size = 64
rgw enable usage log = false
rgw dns name = localhost
EOF
}

# _ceph_rgw_keys DIR: write DIR/keyring with every key of the cluster,
# the one keyring all daemons and clients read; ceph-mon --mkfs loads it
# into the auth database, so no key is created over the network.  The
# keys are generated here in one process rather than by one ceph-authtool
# run per key (each costs ~0.1 s on a loaded machine): a key is base64 of
# type (u16 1 = AES), created (u32 sec, u32 nsec), length (u16 16) and 16
# random bytes, little-endian, as CryptoKey::encode writes it.
_ceph_rgw_keys()
{
    /usr/bin/python3 - "$1/keyring" <<'PYEOF'
import base64, os, struct, sys, time
caps = [
    ("mon.", [("mon", "allow *")]),
    ("client.admin", [("mds", "allow *"), ("mgr", "allow *"),
                      ("mon", "allow *"), ("osd", "allow *")]),
    ("mgr.x", [("mds", "allow *"), ("mon", "allow profile mgr"),
               ("osd", "allow *")]),
    ("osd.0", [("mgr", "allow profile osd"), ("mon", "allow profile osd"),
               ("osd", "allow *")]),
    ("client.rgw", [("mgr", "allow rw"), ("mon", "allow rw"),
                    ("osd", "allow rwx")]),
]
now = time.time()
out = []
for name, cl in caps:
    raw = struct.pack("<HIIH", 1, int(now), 0, 16) + os.urandom(16)
    out.append("[%s]\n\tkey = %s\n" % (name, base64.b64encode(raw).decode()))
    out += ['\tcaps %s = "%s"\n' % c for c in cl]
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with os.fdopen(fd, "w") as f:
    f.write("".join(out))
PYEOF
}

# _ceph_rgw_wait_cmd DIR DAEMON CMD...: run CMD (a client of the cluster)
# while watching DAEMON: if DAEMON dies first, CMD is killed and this
# fails, so a daemon that could not start (its port taken) costs no
# client timeout.  Returns CMD's status.  CMD's output goes to
# DIR/log/client.out.
_ceph_rgw_wait_cmd()
{
    local dir=$1 daemon=$2 cpid rc=0
    shift 2
    "$@" </dev/null >>"$dir/log/client.out" 2>&1 &
    cpid=$!
    while kill -0 "$cpid" 2>/dev/null; do
        if ! _ceph_rgw_alive "$dir" "$daemon"; then
            kill -KILL "$cpid" 2>/dev/null
            wait "$cpid" 2>/dev/null
            echo "ceph-rgw: $daemon died while running: $*" >&2
            return 1
        fi
        sleep 0.02
    done
    wait "$cpid" || rc=$?
    [ "$rc" -eq 0 ] || echo "ceph-rgw: exit $rc: $*" >&2
    return "$rc"
}

# _ceph_rgw_wait_log DIR DAEMON REGEX: wait until the cluster log
# DIR/log/cluster.log has a line matching REGEX (grep -E), while DAEMON
# and the mon are alive.  A startup guard: 60 s.
_ceph_rgw_wait_log()
{
    local dir=$1 daemon=$2 re=$3 i d
    for (( i = 0; i < 3000; i++ )); do
        grep -qE -- "$re" "$dir/log/cluster.log" 2>/dev/null && return 0
        for d in mon.a "$daemon"; do
            _ceph_rgw_alive "$dir" "$d" || {
                echo "ceph-rgw: $d exited (see $dir/log/$d.log)" >&2
                return 1
            }
        done
        sleep 0.02
    done
    echo "ceph-rgw: no '$re' in $dir/log/cluster.log within 60 s" >&2
    return 1
}

# _ceph_rgw_wait_s3 DIR: wait until radosgw answers HTTP on its port.
# A startup guard, not a performance check: 60 s is far beyond what a
# healthy radosgw needs.
_ceph_rgw_wait_s3()
{
    local dir=$1 port i
    port=$(cat "$dir/rgw-port")
    for (( i = 0; i < 3000; i++ )); do
        _ceph_rgw_alive "$dir" client.rgw || {
            echo "ceph-rgw: radosgw exited (see $dir/log/client.rgw.log)" >&2
            return 1
        }
        # An anonymous ListBuckets: 200 once the frontend and the
        # gateway's pools are ready.
        if curl -s -o /dev/null --max-time 5 -w '%{http_code}' \
                "http://127.0.0.1:$port/" 2>/dev/null | grep -q '^200$'; then
            return 0
        fi
        sleep 0.02
    done
    echo "ceph-rgw: radosgw on port $port did not answer within 60 s" >&2
    return 1
}

# _ceph_rgw_start_rgw DIR: start radosgw on DIR's port.
_ceph_rgw_start_rgw()
{
    _ceph_rgw_daemon "$1" client.rgw radosgw -f -c "$1/ceph.conf" -n client.rgw
}

# _ceph_rgw_try DIR: one attempt at bringing the cluster up in DIR
# (empty).  Returns non-zero, leaving daemons for the caller to stop, on
# any failure.
_ceph_rgw_try()
{
    local dir=$1 monport rgwport fsid ak sk ports
    ports=$(_ceph_rgw_ports 2) || return 1
    read -r monport rgwport <<<"$ports"
    mkdir -p "$dir"/{log,run,crash,mon.a,mgr.x,osd.0,client.rgw,mgr-modules} ||
        return 1
    : >"$dir/pids"
    echo "$rgwport" >"$dir/rgw-port"
    _ceph_rgw_conf "$dir" "$monport" "$rgwport" || return 1
    _ceph_rgw_keys "$dir" || return 1
    fsid=$(awk '$1 == "fsid" { print $3 }' "$dir/ceph.conf")
    # The first maps, made offline: the mon's, and an OSD map in which
    # osd.0 already exists (ceph-mon --mkfs --osdmap), so the OSD boots
    # without an `osd new` round trip through the slow python CLI.
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$monport]" \
        "$dir/monmap" >>"$dir/log/client.out" 2>&1 || return 1
    osdmaptool -c "$dir/ceph.conf" --createsimple 1 --clobber \
        "$dir/osdmap" >>"$dir/log/client.out" 2>&1 || return 1
    ceph-mon -c "$dir/ceph.conf" -i a --mkfs --monmap "$dir/monmap" \
        --osdmap "$dir/osdmap" --keyring "$dir/keyring" \
        >>"$dir/log/client.out" 2>&1 || return 1
    ceph-osd -c "$dir/ceph.conf" -i 0 --mkfs --no-mon-config \
        >>"$dir/log/client.out" 2>&1 || return 1
    _ceph_rgw_log "mon and osd created"

    _ceph_rgw_daemon "$dir" mon.a ceph-mon -f -c "$dir/ceph.conf" -i a
    _ceph_rgw_daemon "$dir" osd.0 ceph-osd -f -c "$dir/ceph.conf" -i 0
    _ceph_rgw_daemon "$dir" mgr.x ceph-mgr -f -c "$dir/ceph.conf" -i x
    # radosgw creates its pools first thing.  A pool created while no OSD
    # is up gets its PGs only at a later mon tick (5 s), so radosgw starts
    # once the mon has logged the OSD's boot.
    _ceph_rgw_wait_log "$dir" osd.0 ' osd\.0 .* boot$' || return 1
    _ceph_rgw_log "osd up"
    _ceph_rgw_start_rgw "$dir"
    _ceph_rgw_wait_s3 "$dir" || return 1
    _ceph_rgw_log "radosgw answers"

    ak=$(head -c 15 /dev/urandom | base32 | tr -d =)
    sk=$(head -c 30 /dev/urandom | base64 | tr -d '=/+')
    _ceph_rgw_wait_cmd "$dir" osd.0 \
        radosgw-admin -c "$dir/ceph.conf" user create --uid=cbt \
        --display-name=cbt --access-key="$ak" --secret-key="$sk" || return 1
    _ceph_rgw_log "S3 user created"
    cat >"$dir/env" <<EOT
AWS_ENDPOINT_URL=http://127.0.0.1:$rgwport
AWS_ACCESS_KEY_ID=$ak
AWS_SECRET_ACCESS_KEY=$sk
AWS_REGION=us-east-1
CEPH_RGW_DIR=$dir
EOT
}

# ceph_rgw_start DIR: bring the cluster up in DIR (absent or empty),
# export the AWS_* variables of DIR/env and, when tests/functions.sh is
# loaded, register ceph_rgw_stop DIR as a cleanup.  Up to 3 attempts, each
# with new ports; the logs of a failed attempt stay in DIR.failed-N.
ceph_rgw_start()
{
    local dir=$1 attempt t0=$EPOCHREALTIME
    if [ -e "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
        echo "ceph-rgw: $dir exists and is not empty" >&2
        return 1
    fi
    if declare -F cleanup_fn >/dev/null; then
        cleanup_fn ceph_rgw_stop "$dir"
    fi
    for attempt in 1 2 3; do
        if _ceph_rgw_try "$dir"; then
            set -a
            # shellcheck disable=SC1091
            . "$dir/env"
            set +a
            _ceph_rgw_log "up in $(awk -v a="$t0" -v b="$EPOCHREALTIME" \
                'BEGIN { printf "%.2f", b - a }') s"
            return 0
        fi
        ceph_rgw_stop "$dir"
        rm -rf "$dir.failed-$attempt"
        mv "$dir" "$dir.failed-$attempt"
        echo "ceph-rgw: attempt $attempt failed, logs in $dir.failed-$attempt" >&2
    done
    return 1
}

# _ceph_rgw_kill DIR [NAME]: SIGKILL the daemons of DIR (only NAME if
# given) and wait until they are gone.
_ceph_rgw_kill()
{
    local dir=$1 only=${2:-} name pid i
    [ -f "$dir/pids" ] || return 0
    while read -r name pid; do
        [ -z "$only" ] || [ "$name" = "$only" ] || continue
        _ceph_rgw_running "$dir" "$pid" && kill -KILL "$pid" 2>/dev/null
    done <"$dir/pids"
    while read -r name pid; do
        [ -z "$only" ] || [ "$name" = "$only" ] || continue
        # SIGKILL cannot be caught: this ends within moments; the bound
        # only keeps a stuck kernel from hanging the caller.
        for (( i = 0; i < 1000; i++ )); do
            _ceph_rgw_running "$dir" "$pid" || break
            sleep 0.01
        done
    done <"$dir/pids"
    return 0
}

# ceph_rgw_stop DIR: kill every daemon of DIR.  DIR itself stays (the
# caller's cleanup removes it).
ceph_rgw_stop()
{
    _ceph_rgw_kill "$1"
}

# ceph_rgw_stop_rgw DIR / ceph_rgw_start_rgw DIR: take radosgw away (the
# S3 endpoint then refuses connections) and bring it back on the same
# port, waiting until it answers.
ceph_rgw_stop_rgw()
{
    _ceph_rgw_kill "$1" client.rgw
}

ceph_rgw_start_rgw()
{
    _ceph_rgw_start_rgw "$1"
    _ceph_rgw_wait_s3 "$1"
}

# By hand: bash tests/ceph-rgw.sh start|stop|stop-rgw|start-rgw DIR
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -uo pipefail
    case "${1:-}:${2:-}" in
        start:?*)
            dir=$(realpath -m "$2")
            ceph_rgw_start "$dir" || exit 1
            cat "$dir/env"
            ;;
        stop:?*) ceph_rgw_stop "$(realpath -m "$2")" ;;
        stop-rgw:?*) ceph_rgw_stop_rgw "$(realpath -m "$2")" ;;
        start-rgw:?*) ceph_rgw_start_rgw "$(realpath -m "$2")" || exit 1 ;;
        *)
            echo "usage: bash $0 start|stop|stop-rgw|start-rgw DIR" >&2
            exit 2
            ;;
    esac
fi
