#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs the real MQTT clients the
# integration tests drive (mosquitto, paho-mqtt, MQTT.js) when missing, then
# runs every unit, property, harness and integration test with the brokers
# on the io_uring socket loop, and the integration tests (every one that
# starts the real binary) once more on the epoll loop: both loops must
# behave the same. `--io uring` refuses to start on a kernel without what
# the loop needs, so a machine that cannot run it fails here, loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/support/ensure-tools.sh
COREMQ_TEST_IO=uring cargo test --workspace --all-targets --release "$@"
integration=()
for t in tests/*.rs; do integration+=(--test "$(basename "$t" .rs)"); done
COREMQ_TEST_IO=epoll cargo test --release "${integration[@]}" "$@"
