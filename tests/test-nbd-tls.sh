#!/usr/bin/env bash
# TLS on the NBD sockets (issue 14), with certificates and keys made here
# by certtool and psktool:
#   - X.509, --tls=require --tls-verify-peer, TCP and unix: nbdinfo,
#     nbdcopy, qemu-io and qemu-img (tls-creds-x509 objects) work over TLS
#     and the data round-trips; a plain client gets "TLS required"; a
#     client without a certificate is refused; a client that stops after
#     STARTTLS is cut at the handshake deadline.
#   - --tls=on: plain and TLS clients both served.
#   - PSK (--tls-psk, psktool's file): the right key works, a wrong key is
#     refused.
#   - cbt backup from a --tls=require daemon (nbds+unix:// URI with the
#     client's certificates) and cbt restore into another TLS export.
# The daemon stays up through every refusal and stops cleanly (exit 0).

source "$(dirname "$0")/functions.sh"
requires certtool psktool nbdinfo nbdcopy qemu-io qemu-img

# ---- certificates --------------------------------------------------------
pki=$tmp/pki
mkdir -p "$pki/server" "$pki/client" "$pki/nocert"
(
    cd "$pki"
    certtool --generate-privkey --outfile ca-key.pem 2>/dev/null
    printf 'cn = cbt test CA\nca\ncert_signing_key\nexpiration_days = 2\n' >ca.info
    certtool --generate-self-signed --load-privkey ca-key.pem --template ca.info \
        --outfile ca-cert.pem 2>/dev/null
    for who in server client; do
        certtool --generate-privkey --outfile "$who/$who-key.pem" 2>/dev/null
        {
            echo "organization = cbt test"
            echo "cn = localhost"
            echo "dns_name = localhost"
            echo "ip_address = 127.0.0.1"
            echo "tls_www_$who"
            echo "encryption_key"
            echo "signing_key"
            echo "expiration_days = 2"
        } >"$who.info"
        certtool --generate-certificate --load-ca-certificate ca-cert.pem \
            --load-ca-privkey ca-key.pem --load-privkey "$who/$who-key.pem" \
            --template "$who.info" --outfile "$who/$who-cert.pem" 2>/dev/null
        cp ca-cert.pem "$who/"
    done
    cp ca-cert.pem nocert/
) || die "certtool failed"

disk=$tmp/disk.img
truncate -s 64M "$disk"
port=$(free_tcp_port)
start_filterd --image "$disk" --format raw --socket "$tmp/nbd.sock" \
    --listen 127.0.0.1:"$port" --tls require --tls-certificates "$pki/server" \
    --tls-verify-peer --handshake-timeout 3
tcp_tls="nbds://127.0.0.1:$port/?tls-certificates=$pki/client"
unix_tls="nbds+unix:///?socket=$tmp/nbd.sock&tls-certificates=$pki/client"

# qemu's view of the same export over TLS.
qobj="tls-creds-x509,id=tls0,dir=$pki/client,endpoint=client"
qtcp="driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=$port,tls-creds=tls0"
qunix="driver=nbd,server.type=unix,server.path=$tmp/nbd.sock,tls-creds=tls0,tls-hostname=localhost"

nbdinfo --size "$tcp_tls" >"$tmp/size" 2>"$tmp/err" ||
    die "nbdinfo over TLS (TCP) failed: $(cat "$tmp/err")"
[ "$(cat "$tmp/size")" = $((64 << 20)) ] || die "nbdinfo over TLS: wrong size"
nbdinfo --size "$unix_tls" >/dev/null 2>"$tmp/err" ||
    die "nbdinfo over TLS (unix) failed: $(cat "$tmp/err")"

# Writes over TLS (qemu-io, TCP), read back over TLS (nbdcopy, unix) and
# by qemu-img over TLS.
qemu-io --object "$qobj" --image-opts "$qtcp" \
    -c "write -P 0x5a 0 1M" -c "write -P 0xa5 32M 3M" >"$tmp/qio" 2>&1 ||
    { cat "$tmp/qio"; die "qemu-io write over TLS failed"; }
grep -qi "fail\|error" "$tmp/qio" && { cat "$tmp/qio"; die "qemu-io write over TLS failed"; }
nbdcopy "$unix_tls" "$tmp/copy.raw" || die "nbdcopy over TLS failed"
cmp "$tmp/copy.raw" "$disk" || die "nbdcopy over TLS: data differs from the image"
qemu-img convert -O raw --object "$qobj" --image-opts "$qunix" "$tmp/convert.raw" ||
    die "qemu-img convert over TLS (unix) failed"
cmp "$tmp/convert.raw" "$disk" || die "qemu-img over TLS: data differs"
qemu-io -r --object "$qobj" --image-opts "$qtcp" -c "read -P 0xa5 32M 3M" >"$tmp/qio" 2>&1 ||
    { cat "$tmp/qio"; die "qemu-io read over TLS failed"; }

# Refusals: a plain client, a client without a certificate, a client
# that stops after STARTTLS.
if nbdinfo --size "nbd://127.0.0.1:$port/" >/dev/null 2>"$tmp/err"; then
    die "a plain client was served with --tls=require"
fi
grep -qi "tls" "$tmp/err" || die "the plain client was not told TLS is required: $(cat "$tmp/err")"
if nbdinfo --size "nbds://127.0.0.1:$port/?tls-certificates=$pki/nocert" >/dev/null 2>&1; then
    die "a client without a certificate was served with --tls-verify-peer"
fi
"$PYTHON" - "$tmp/nbd.sock" <<'PYEOF' || die "the client stalling after STARTTLS was not cut"
import struct, sys
import nbdraw
s = nbdraw.connect(sys.argv[1])
s.settimeout(30)
nbdraw.recvn(s, 18)
s.sendall(struct.pack(">I", 3) + nbdraw.option(nbdraw.OPT_STARTTLS))
assert struct.unpack(">QIII", nbdraw.recvn(s, 20))[2] == 1, "STARTTLS not acknowledged"
# No ClientHello: the server must give up at its deadline (3 s).
while s.recv(4096):
    pass
PYEOF
grep -q "TLS handshake timed out" "$log" || die "no log line for the stalled TLS handshake"
kill -0 "$pid" || die "the daemon died"
stop_filterd

# ---- cbt backup and restore over TLS ---------------------------------------
# Backup from a --tls=require daemon through an nbds+unix:// URI naming the
# client's certificates; restore into another TLS daemon's export.
start_filterd --image "$disk" --format raw --tls require \
    --tls-certificates "$pki/server" --tls-verify-peer \
    --bitmap "$tmp/disk.bm" --control "$tmp/ctl"
cbt backup --uri "nbds+unix:///?socket=$sock&tls-certificates=$pki/client" \
    --control "$tmp/ctl" --repo "$tmp/repo" --full >"$tmp/backup.out" 2>&1 ||
    { cat "$tmp/backup.out"; die "cbt backup over TLS failed"; }
if cbt backup --uri "nbd+unix:///?socket=$sock" --control "$tmp/ctl" \
        --repo "$tmp/repo" >"$tmp/backup.out" 2>&1; then
    die "cbt backup without TLS was served by a --tls=require daemon"
fi
stop_filterd
truncate -s 64M "$tmp/target.img"
start_filterd --image "$tmp/target.img" --format raw --tls require \
    --tls-certificates "$pki/server"
cbt restore --repo "$tmp/repo" --output "nbds+unix:///?socket=$sock&tls-certificates=$pki/client" \
    >"$tmp/restore.out" 2>&1 || { cat "$tmp/restore.out"; die "cbt restore over TLS failed"; }
stop_filterd
cmp "$tmp/target.img" "$disk" || die "restore over TLS differs from the disk"

# ---- --tls=on: both kinds of client --------------------------------------
start_filterd --image "$disk" --format raw --tls on --tls-certificates "$pki/server"
nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null || die "--tls=on: plain client refused"
nbdinfo --size "nbds+unix:///?socket=$sock&tls-certificates=$pki/client" >/dev/null ||
    die "--tls=on: TLS client refused"
stop_filterd

# ---- PSK -----------------------------------------------------------------
psktool -u alice -p "$tmp/keys.psk" >/dev/null 2>&1 || die "psktool failed"
psktool -u alice -p "$tmp/wrong.psk" >/dev/null 2>&1 || die "psktool failed"
start_filterd --image "$disk" --format raw --tls require --tls-psk "$tmp/keys.psk"
nbdcopy "nbds+unix://alice@/?socket=$sock&tls-psk-file=$tmp/keys.psk" \
    "$tmp/psk.raw" || die "nbdcopy with the right PSK failed"
cmp "$tmp/psk.raw" "$disk" || die "PSK copy differs"
if nbdinfo --size "nbds+unix://alice@/?socket=$sock&tls-psk-file=$tmp/wrong.psk" \
        >/dev/null 2>&1; then
    die "a wrong PSK was accepted"
fi
grep -q "TLS handshake failed" "$log" || die "no log line for the wrong PSK"
stop_filterd

# Option errors are named.
expect_rc 2 "$CBT_FILTERD" --image "$disk" --socket "$tmp/x.sock" --tls require
expect_rc 2 "$CBT_FILTERD" --image "$disk" --socket "$tmp/x.sock" --tls maybe
echo "TLS: OK"
