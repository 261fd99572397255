#!/usr/bin/env bash
# The benchmark suite in one command: measures the worker side by side with a bare NATS
# echo responder and with the Python reference (millracer 0.2.0), then prints a table.
#
#   scripts/bench.sh                 every figure (about 15 minutes)
#   scripts/bench.sh roundtrip memory   some of them: roundtrip inspect-throughput ops-status
#                                    memory monitor-cpu detection status-throughput
#                                    status-paced enqueue-exit memory-after-load operator
#                                    (or 1..11)
#   scripts/bench.sh --quick         a short smoke run (sizes below the documented minimums)
#
# What it does:
#   1. scripts/setup.sh: the pinned nats-server and millrace in .venv/ and the reference in
#      .venv-ref/ (millracer==0.2.0 with millrace-ai==0.21.1; no-op when there);
#   2. (nothing else to install);
#   3. cargo build --release of the worker binary and of examples/bench.rs;
#   4. runs the example; every process it starts (nats-server, workers, the reference,
#      runtime daemons) is private to the run and killed at its end. Its whole output (with
#      the commit measured) is kept in docs/benchmark-runs/.
# Results and method: docs/benchmarks.md.
set -euo pipefail


ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
REF_VENV="$ROOT/.venv-ref"

say() { echo "bench.sh: $*" >&2; }
die() {
    echo "bench.sh: error: $*" >&2
    exit 1
}

command -v cargo >/dev/null 2>&1 || die "cargo not found on PATH (install a Rust toolchain: https://rustup.rs)"

say "scripts/setup.sh"
scripts/setup.sh >/dev/null || die "scripts/setup.sh failed"

[[ -x "$REF_VENV/bin/millracer" ]] || die "scripts/setup.sh did not install the reference into $REF_VENV"

say "cargo build --release"
cargo build --release --quiet --bin millracer --example bench || die "cargo build --release failed"

export MILLRACER_BENCH_NATS_SERVER="$ROOT/.venv/bin/nats-server"
export MILLRACER_BENCH_MILLRACE="$ROOT/.venv/bin/millrace"
export MILLRACER_BENCH_REFERENCE="$REF_VENV/bin/millracer"
# The commit measured (with -dirty when the measured sources differ from it), and the raw
# output kept beside the docs: docs/benchmark-runs/bench-<commit>-<UTC time>.txt.
COMMIT="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD -- src examples benches Cargo.toml Cargo.lock 2>/dev/null || COMMIT="$COMMIT-dirty"
export MILLRACER_BENCH_COMMIT="$COMMIT"
mkdir -p docs/benchmark-runs
OUT="docs/benchmark-runs/bench-$COMMIT-$(date -u +%Y%m%dT%H%M%SZ).txt"
say "running: cargo run --release --example bench -- $* (raw output: $OUT)"
cargo run --release --quiet --example bench -- "$@" 2>&1 | tee "$OUT"
