#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs the real MQTT clients the
# integration tests drive (mosquitto, paho-mqtt, MQTT.js) when missing, then
# runs every unit, property, harness and integration test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/support/ensure-tools.sh
cargo test --workspace --all-targets --release "$@"
