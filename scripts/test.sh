#!/usr/bin/env bash
# The whole check, as CI runs it (.ci/run):
#   1. scripts/setup.sh   (the pinned nats-server, millrace and pi; quick when already there)
#   2. cargo fmt --all -- --check
#   3. cargo clippy --all-targets -- -D warnings
#   4. cargo test --all-targets [ARGS...]   with MILLRACER_TEST_NATS_SERVER,
#      MILLRACER_TEST_NATS_SERVER_OLD, MILLRACER_TEST_MILLRACE, MILLRACER_TEST_PI and
#      MILLRACER_TEST_REFERENCE (the Python reference, for tests/parity.rs) set to the
#      binaries setup.sh installed.
#
# Usage: scripts/test.sh [extra cargo test arguments]
#   scripts/test.sh                          everything
#   scripts/test.sh --test contracts         only tests/contracts.rs (plus the unit tests)
#   scripts/test.sh -- --nocapture           show test output
# Exits non-zero on the first step that fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

step() { printf '\n==> %s\n' "$*" >&2; }
fail() {
    echo "test.sh: FAILED: $*" >&2
    exit 1
}

command -v cargo >/dev/null 2>&1 || fail "cargo not found on PATH (install a Rust toolchain: https://rustup.rs)"

step "scripts/setup.sh"
scripts/setup.sh || fail "scripts/setup.sh"

export MILLRACER_TEST_NATS_SERVER="$ROOT/.venv/bin/nats-server"
# The oldest nats-server millracer supports (tests/first_contact.rs runs the core scenarios
# against it too).
export MILLRACER_TEST_NATS_SERVER_OLD="$ROOT/.venv-old/bin/nats-server"
export MILLRACER_TEST_MILLRACE="$ROOT/.venv/bin/millrace"
export MILLRACER_TEST_PI="$ROOT/.tools/pi/node_modules/.bin/pi"
export MILLRACER_TEST_REFERENCE="$ROOT/.venv-ref/bin/millracer"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

step "cargo fmt --all -- --check"
cargo fmt --all -- --check || fail "cargo fmt --all -- --check (run cargo fmt --all)"

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings || fail "cargo clippy --all-targets -- -D warnings"

step "cargo test --all-targets $*"
cargo test --all-targets "$@" || fail "cargo test --all-targets $*"

echo "test.sh: all checks passed" >&2
