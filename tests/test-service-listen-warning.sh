#!/usr/bin/env bash
# NBD over TCP reaches whoever reaches the port: cbt-filterd warns at start,
# naming each TCP listener (its own --listen, or a TCP socket inherited
# from a service manager) and the reason, unless TLS is required and
# authenticates the clients.  A unix socket alone gets no warning.

source "$(dirname "$0")/functions.sh"
requires nbdinfo systemd-socket-activate

disk=$tmp/disk.img
truncate -s 16M "$disk"
plain="NBD over TCP without TLS is neither encrypted nor authenticated: anyone who can reach it can read and write the disk; use it on trusted networks only"

# warned LOG TEXT: the daemon's log has one warning line with TEXT.
warned()
{
    [ "$(grep -c "^cbt-filterd: warning: .*$2" "$1")" -eq 1 ] ||
        { _show_log "$1"; die "expected one warning '$2' in $1"; }
}
# not_warned LOG: no warning about TCP.
not_warned()
{
    ! grep -q "warning: .*TCP\|warning: .*TLS\|trusted networks" "$1" ||
        { _show_log "$1"; die "unexpected warning in $1"; }
}

# A unix socket only: nothing to warn about.
start_filterd --image "$disk" --format raw
not_warned "$log"
stop_filterd

# --listen without TLS.
port=$(free_tcp_port)
start_filterd --image "$disk" --format raw --listen "127.0.0.1:$port"
warned "$log" "127.0.0.1:$port: $plain"
[ "$(nbdinfo --size "$uri")" = 16777216 ] || die "not served over TCP"
stop_filterd

# A TCP socket from the service manager: the same warning, with the
# address the manager bound.
port=$(free_tcp_port)
systemd-socket-activate -l "127.0.0.1:$port" --fdname=nbd-tcp \
    "$CBT_FILTERD" --image "$disk" --format raw </dev/null >"$tmp/sa.log" 2>&1 &
sa=$!
_daemon_log[$sa]=$tmp/sa.log
cleanup_fn _kill_daemon "$sa"
for (( i = 0; i < 300; i++ )); do
    grep -q "^Listening on" "$tmp/sa.log" && break
    sleep 0.1
done
[ "$(nbdinfo --size "nbd://127.0.0.1:$port/")" = 16777216 ] ||
    die "not served on the inherited TCP socket"
warned "$tmp/sa.log" "127.0.0.1:$port: $plain"
kill -TERM "$sa"
wait "$sa" || die "daemon on the inherited TCP socket: exit $? after SIGTERM"

# TLS: optional TLS still serves plain clients (warned); required TLS
# with pre-shared keys authenticates every client (not warned).
if command -v psktool >/dev/null; then
    psktool -u alice -p "$tmp/keys.psk" >/dev/null 2>&1 || die "psktool failed"
    port=$(free_tcp_port)
    start_filterd --image "$disk" --format raw --listen "127.0.0.1:$port" \
        --tls on --tls-psk "$tmp/keys.psk"
    warned "$log" "127.0.0.1:$port: with --tls on, clients that do not ask for TLS are served unencrypted"
    stop_filterd
    port=$(free_tcp_port)
    start_filterd --image "$disk" --format raw --listen "127.0.0.1:$port" \
        --tls require --tls-psk "$tmp/keys.psk"
    not_warned "$log"
    stop_filterd
else
    echo "$progname: psktool (gnutls-bin) missing: TLS cases not checked" >&2
fi
exit 0
