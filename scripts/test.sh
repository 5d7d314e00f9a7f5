#!/usr/bin/env bash
# The whole test suite. Installs and starts what the tests need when it is missing,
# then runs every test in the workspace (unit, integration, doc tests).
# Usage: bash scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

# Services the tests need are started here as the crates that need them land
# (Redis for crates/queue, PostgreSQL for crates/postgres, Chromium for the dashboard).

export RUST_BACKTRACE=1
cargo test --workspace --all-features "$@"
