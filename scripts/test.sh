#!/usr/bin/env bash
# The whole test suite. Installs and starts what the tests need when it is missing,
# then runs every test in the workspace (unit, integration, doc tests).
# Usage: bash scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

# Services the tests need are started here as the crates that need them land
# (Redis for crates/queue, PostgreSQL for crates/postgres).

# Chromium, for the dashboard test (crates/gateway/tests/dashboard.rs), which renders the page in
# a real headless browser. BULWARK_CHROMIUM names another binary.
if [ -z "${BULWARK_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
    echo "scripts/test.sh: installing Chromium (Debian package chromium) for the dashboard test"
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q chromium >/dev/null 2>&1 \
        || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q chromium >/dev/null; }
fi

export RUST_BACKTRACE=1
cargo test --workspace --all-features "$@"
