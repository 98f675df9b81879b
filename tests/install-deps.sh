#!/usr/bin/env bash
# Install the Debian 12 packages cbt needs to build, test, demo and bench.
#
# Idempotent: when every package is already installed it only checks
# (one dpkg-query) and returns.  Otherwise it runs `apt-get update` once and
# installs the missing ones without recommends.  Needs root for the install
# step; run it as root (CI does) or with sudo.
#
# Usage: bash tests/install-deps.sh

set -euo pipefail

packages=(
    # build
    build-essential gcc clang meson ninja-build pkg-config
    liburing-dev libglib2.0-dev libjson-c-dev libnbd-dev zlib1g-dev libssl-dev
    libgnutls28-dev
    # chunk checksums: XXH128 (cbt/repo/checksum.c)
    libxxhash-dev
    # S3 repositories: HTTP and AWS SigV4 signing (cbt/s3/s3.c)
    libcurl4-openssl-dev
    # cbt mount (FUSE): the library and fusermount3
    libfuse3-dev fuse3
    # unit tests and clang's sanitizer runtimes (ASan/UBSan/LSan and libFuzzer
    # for clang 14)
    libcmocka-dev libclang-rt-14-dev
    # end-to-end tests, demo and benchmarks: real NBD clients and servers
    qemu-utils libnbd-bin python3 python3-libnbd nbdkit fio
    # TLS tests: certtool and psktool
    gnutls-bin
    # instant restore: a TCG guest boots from the restored disk
    qemu-system-x86
    # service tests: systemd-socket-activate and systemd-analyze (they need
    # no systemd running), and the systemd.pc that says where units go
    systemd
    # man page tests: groff, man, lexgrog
    groff-base man-db
    # S3 tests: a one-node Ceph cluster with a RADOS Gateway (tests/ceph-rgw.sh)
    ceph-mon ceph-mgr ceph-osd radosgw ceph-common curl
    # tools the test scripts call (xxhash: xxh128sum, to cross-check the
    # manifest's XXH128 sums)
    coreutils util-linux procps jq xxhash
)

# dpkg-query prints one status line per known package; anything that is
# not "install ok installed" (or unknown to dpkg) is missing.
missing=()
for p in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    if [[ $status != "install ok installed" ]]; then
        missing+=("$p")
    fi
done

if (( ${#missing[@]} == 0 )); then
    echo "install-deps: all ${#packages[@]} packages already installed"
    exit 0
fi

echo "install-deps: missing: ${missing[*]}"

sudo=()
if (( EUID != 0 )); then
    if command -v sudo >/dev/null; then
        sudo=(sudo)
    else
        echo "install-deps: must run as root to install packages" >&2
        exit 1
    fi
fi

echo "install-deps: apt-get update"
"${sudo[@]}" apt-get update -q
echo "install-deps: apt-get install ${missing[*]}"
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "install-deps: done"
