#!/usr/bin/env bash
# Time to a clear answer for a workspace no worker serves, side by side in one run with a
# served request through the same bridge and with waiting for a worker (what an unserved
# request did before the registry: wait, here bounded by --timeout 2).
#
#   scripts/bench-unserved.sh [ROUNDS]     (default 30 rounds; sides alternate every round)
#   PROFILE=debug scripts/bench-unserved.sh   use the debug build (quicker to build; an upper
#                                             bound for the release figures)
#
# A private nats-server (JetStream) on a free loopback port and one worker serving `shop`;
# every request is `millracer ops --json --transport nats` (a new process each time, as an
# adapter shelling out would run it). Prints per side: runs, exit code seen, median, p90, max.
# Results and method: docs/benchmarks-shared-bus.md.
set -euo pipefail

ROUNDS="${1:-30}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
say() { echo "bench-unserved.sh: $*" >&2; }

scripts/setup.sh >/dev/null
PROFILE="${PROFILE:-release}"
if [[ "$PROFILE" == release ]]; then
    cargo build --release --quiet --bin millracer
else
    cargo build --quiet --bin millracer
fi
BIN="$ROOT/target/$PROFILE/millracer"
NATS="$ROOT/.venv/bin/nats-server"
export PATH="$ROOT/.venv/bin:$PATH"

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
URL="nats://127.0.0.1:$PORT"
"$NATS" -a 127.0.0.1 -p "$PORT" -js -sd "$WORK/js" >"$WORK/nats.log" 2>&1 &
PIDS+=($!)
mkdir -p "$WORK/shop" "$WORK/home"
"$ROOT/.venv/bin/millrace" init --workspace "$WORK/shop" >/dev/null
HOME="$WORK/home" "$BIN" worker --nats-url "$URL" --workspace "shop=$WORK/shop" >"$WORK/worker.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 300); do
    grep -q "worker ready" "$WORK/worker.log" && break
    sleep 0.1
done
grep -q "worker ready" "$WORK/worker.log" || { cat "$WORK/worker.log" >&2; exit 1; }

request() { # id workspace
    printf '{"schema_version":"millracer.ops.v0.2","request_id":"%s","workspace_ref":{"workspace_id":"%s"},"source":{"kind":"bench"},"action":"status","input":{"kind":"structured_action","payload":{}}}' "$1" "$2"
}

declare -A TIMES CODES
run_side() { # side round
    local side="$1" round="$2" args=() ws=shop
    case "$side" in
        unserved) ws=nobody ;;
        served) ;;
        waiting) ws=nobody; args=(--wait-for-worker --timeout 2) ;;
    esac
    local start end code=0
    start=$(date +%s%N)
    request "bench-$side-$round-$$" "$ws" | HOME="$WORK/home" "$BIN" ops --json --transport nats --nats-url "$URL" "${args[@]}" >/dev/null 2>&1 || code=$?
    end=$(date +%s%N)
    TIMES[$side]+="$(((end - start) / 1000000)) "
    CODES[$side]+="$code "
}

SIDES=(unserved served waiting)
for round in $(seq 1 "$ROUNDS"); do
    # Rotate the order every round so no side always goes first.
    for k in 0 1 2; do
        run_side "${SIDES[$(((round + k) % 3))]}" "$round"
    done
done

printf '%-10s %5s %-9s %8s %8s %8s\n' side runs exits median_ms p90_ms max_ms
for side in "${SIDES[@]}"; do
    read -r -a t <<<"${TIMES[$side]}"
    sorted=($(printf '%s\n' "${t[@]}" | sort -n))
    n=${#sorted[@]}
    exits="$(printf '%s\n' ${CODES[$side]} | sort -u | tr '\n' ',' | sed 's/,$//')"
    printf '%-10s %5d %-9s %8d %8d %8d\n' "$side" "$n" "$exits" \
        "${sorted[$((n / 2))]}" "${sorted[$((n * 9 / 10))]}" "${sorted[$((n - 1))]}"
done
