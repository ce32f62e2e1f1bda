#!/usr/bin/env bash
# Every test of the workspace: unit, property, and real processes (Rust, Python and Node.js
# workers). The Node-worker tests run a real `node`, so Debian's nodejs is installed when it
# is missing; python3 comes with the machine. Extra arguments go to `cargo test`; the run is
# bounded by TEST_TIMEOUT seconds (1500).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v node >/dev/null; then
    echo "test.sh: node is missing; installing Debian's nodejs for the Node-worker tests" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    timeout 600 $sudo apt-get update
    timeout 600 $sudo apt-get install -y nodejs
fi
# Bounded, so a hung test ends the run instead of the run's budget.
exec timeout "${TEST_TIMEOUT:-1500}" cargo test --workspace --locked "$@"
