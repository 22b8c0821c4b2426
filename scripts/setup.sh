#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian host for sgctl: system packages, kernel
# headers for bcc, bpffs, and a .venv with the project and its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    echo "setup: must run as root (installs packages, mounts bpffs)" >&2
    exit 1
fi

# 1. system packages ---------------------------------------------------------
# the benchmark suite (and its smoke test) compares with iptables, nftables and iperf3
# etcd-server: the fleet datastore (sgctl daemon --datastore etcd://...) and its tests
PKGS="python3-bpfcc libbpfcc libbpf1 bpftool iproute2 iputils-ping iptables nftables conntrack iperf3 etcd-server openssl"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    say "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq $missing >/dev/null
fi

# 2. kernel headers for bcc (DESIGN 5) -----------------------------------------
KVER=$(uname -r)
MOD=/lib/modules/$KVER
if [ ! -e "$MOD/build/include/linux/kconfig.h" ] && [ ! -e "$MOD/source/include/linux/kconfig.h" ]; then
    if ! ls -d /usr/src/linux-headers-*-amd64 >/dev/null 2>&1; then
        say "kernel $KVER ships no headers: installing the distribution's linux-headers-amd64"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq linux-headers-amd64 >/dev/null
    fi
    BUILD=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -1)
    COMMON=${BUILD%-amd64}-common
    mkdir -p "$MOD"
    ln -sfn "$BUILD" "$MOD/build"
    ln -sfn "$COMMON" "$MOD/source"
    say "!!! WARNING: kernel $KVER has no headers of its own."
    say "!!! Using the distribution's $(basename "$BUILD") (build) and $(basename "$COMMON") (source)."
    say "!!! sgctl's programs only use uapi structures and bcc helpers, so this works here."
fi

# 3. bpffs ------------------------------------------------------------------
if ! mountpoint -q /sys/fs/bpf; then
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf
    say "mounted bpffs on /sys/fs/bpf"
fi

# 4. .venv with the project ---------------------------------------------------
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$PY" -m venv .venv
fi
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -e "$SITE/bcc" ]; then
    ln -sfn /usr/lib/python3/dist-packages/bcc "$SITE/bcc"
    say "linked Debian's bcc into .venv"
fi
STAMP=.venv/.sgctl-installed
HASH=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
    say "installing sgctl and its Python dependencies into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
    echo "$HASH" > "$STAMP"
fi
.venv/bin/python -c 'import bcc, pyroute2, scapy, yaml' || { echo "setup: .venv is broken" >&2; exit 1; }
say "ready: $ROOT/.venv/bin/sgctl"
