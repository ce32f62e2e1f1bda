#!/usr/bin/env bash
# The project's test command (README, second line): every unit, property and integration test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked
