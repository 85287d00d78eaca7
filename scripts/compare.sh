#!/usr/bin/env bash
# coremq vs mosquitto vs the null broker, rerunnable by anyone: installs
# mosquitto from Debian when it is missing, builds the workspace (release),
# then runs `loadgen compare` with the arguments given here and exits with
# its status. Example:
#   scripts/compare.sh --markdown /tmp/compare.md --json /tmp/compare.json
# See loadgen/README.md, "Comparing brokers", for the flags.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "compare.sh: mosquitto missing; installing it from Debian" >&2
    if [ "$(id -u)" -eq 0 ]; then
        sudo=()
    else
        sudo=(sudo -n)
    fi
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto
    # Debian starts a system mosquitto on port 1883; the comparison starts
    # its own, so leave that one as the package set it up.
fi

cargo build --release --workspace

target_dir="${CARGO_TARGET_DIR:-target}"
set +e
"$target_dir/release/loadgen" compare "$@"
status=$?
exit "$status"
