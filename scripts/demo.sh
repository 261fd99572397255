#!/usr/bin/env bash
# The main job on one machine, from scratch:
#   set-up (scripts/setup.sh), cargo build --release, a private nats-server with JetStream
#   (random port, store in a temp dir), a Millrace workspace made by `millrace init`, a
#   `millracer worker` serving it as workspace `demo`, `millracer events --follow` printing
#   every frame live, then a delegated `enqueue` that the real Millrace runtime runs through
#   its stages (builder, checker, updater). No model credentials are assumed: each stage's
#   runner is the test stand-in (tests/support/stand_in_pi.py), which answers with the
#   stage's success marker in place of a language model; everything else is real. The
#   OpsResult is printed with its completion evidence, then `millracer health` and
#   `millracer queue`. Then the worker is stopped with SIGTERM, the server is stopped and the
#   temp dir is removed. Under a minute after the build.
#
# Usage: scripts/demo.sh
#   MILLRACER_DEMO_KEEP=1 scripts/demo.sh   leave broker and worker running and print how to
#                                           talk to them and how to stop them.
# Exit status: that of the demo request (0 = an OpsResult that is not "failed"), or 1 when a
# step fails. Nothing is written to your HOME: worker and client get HOME=<temp dir>/home.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

KEEP="${MILLRACER_DEMO_KEEP:-0}"
READY_TIMEOUT_SECONDS=10

say() { printf 'demo.sh: %s\n' "$*" >&2; }
die() {
    printf 'demo.sh: error: %s\n' "$*" >&2
    exit 1
}

# --- 1. set-up and build ----------------------------------------------------------------------
# Only what the demo uses: no pi (the worker runs no model here), no old nats-server.
scripts/setup.sh --no-pi --no-old-nats --no-ref >/dev/null
NATS_SERVER="$ROOT/.venv/bin/nats-server"
MILLRACE="$ROOT/.venv/bin/millrace"

say "cargo build --release"
cargo build --release
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
[[ "$TARGET_DIR" == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
MILLRACER="$TARGET_DIR/release/millracer"
[[ -x "$MILLRACER" ]] || die "cargo build --release did not produce $MILLRACER"

# The worker runs `millrace` by name: use the pinned one. Keep the user's HOME untouched.
export PATH="$ROOT/.venv/bin:$PATH"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/millracer-demo.XXXXXX")"
export HOME="$TMP/home"
mkdir -p "$HOME" "$TMP/nats" "$TMP/workspace"
# A setting from the caller's shell must not redirect the demo elsewhere.
unset MILLRACER_NATS_URL MILLRACER_TRANSPORT MILLRACER_CONFIG MILLRACER_NATS_USER \
    MILLRACER_NATS_PASSWORD MILLRACER_NATS_TOKEN MILLRACER_NATS_CREDS MILLRACER_MILLRACE_COMMAND

NATS_PID=""
WORKER_PID=""
KEEP_RUNNING=0

# shellcheck disable=SC2329 # called from cleanup
show_log() {
    [[ -s "$2" ]] || return 0
    printf -- '----- %s (%s, last 40 lines) -----\n' "$1" "$2" >&2
    tail -n 40 "$2" >&2
    printf -- '----- end of %s -----\n' "$1" >&2
}

# shellcheck disable=SC2329 # the EXIT trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ "$KEEP_RUNNING" == 1 ]]; then
        exit "$rc"
    fi
    if [[ "$rc" != 0 ]]; then
        show_log "worker log" "$TMP/worker.log"
        show_log "nats-server log" "$TMP/nats-server.log"
    fi
    if [[ -n "$WORKER_PID" ]] && kill -0 "$WORKER_PID" 2>/dev/null; then
        say "stopping the worker (SIGTERM to $WORKER_PID)"
        kill -TERM "$WORKER_PID" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$WORKER_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$WORKER_PID" 2>/dev/null; then
            say "worker still running after 10 s: SIGKILL"
            kill -KILL "$WORKER_PID" 2>/dev/null || true
        fi
        local wrc=0
        wait "$WORKER_PID" 2>/dev/null || wrc=$?
        say "worker exited with status $wrc"
    fi
    if [[ -n "$NATS_PID" ]] && kill -0 "$NATS_PID" 2>/dev/null; then
        say "stopping nats-server ($NATS_PID)"
        kill -TERM "$NATS_PID" 2>/dev/null || true
        wait "$NATS_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 2. a private nats-server -----------------------------------------------------------------
"$NATS_SERVER" -a 127.0.0.1 -p -1 -js -sd "$TMP/nats" --ports_file_dir "$TMP/nats" \
    >"$TMP/nats-server.log" 2>&1 &
NATS_PID=$!
PORTS_FILE="$TMP/nats/nats-server_$NATS_PID.ports"
NATS_URL=""
for _ in $(seq 100); do
    kill -0 "$NATS_PID" 2>/dev/null || die "nats-server exited at start"
    if [[ -s "$PORTS_FILE" ]]; then
        NATS_URL="$(grep -o 'nats://[^"]*' "$PORTS_FILE" | head -n 1 || true)"
        [[ -n "$NATS_URL" ]] && break
    fi
    sleep 0.1
done
[[ -n "$NATS_URL" ]] || die "nats-server wrote no client URL to $PORTS_FILE within 10 s"
say "nats-server $("$NATS_SERVER" --version | sed 's/^nats-server: //') (JetStream) on $NATS_URL, pid $NATS_PID"

# --- 3. a Millrace workspace ------------------------------------------------------------------
WORKSPACE="$TMP/workspace"
"$MILLRACE" init --workspace "$WORKSPACE" >"$TMP/millrace-init.log" 2>&1 ||
    die "millrace init --workspace $WORKSPACE failed: $(cat "$TMP/millrace-init.log")"
# The stand-in runner in place of a model (said plainly: no credentials are assumed).
STAND_IN="$ROOT/tests/support/stand_in_pi.py"
[[ -x "$STAND_IN" ]] || die "$STAND_IN missing or not executable"
printf '\n[runners.pi]\ncommand = "%s"\n' "$STAND_IN" >>"$WORKSPACE/millrace-agents/millrace.toml"
say "workspace demo = $WORKSPACE (millrace init); stage runner: the test stand-in, NOT a model"

# --- 4. the worker ----------------------------------------------------------------------------
"$MILLRACER" worker --nats-url "$NATS_URL" --workspace "demo=$WORKSPACE" >"$TMP/worker.log" 2>&1 &
WORKER_PID=$!
say "worker started, pid $WORKER_PID, log $TMP/worker.log"

status_request() {
    printf '{"schema_version":"millracer.ops.v0.2","request_id":"%s","workspace_ref":{"workspace_id":"demo"},"source":{"kind":"cli","surface":"demo"},"action":"status","input":{"kind":"structured_action","payload":{}}}' "$1"
}

# Ready = it answers a status request over the bus (any OpsResult counts).
deadline=$((SECONDS + READY_TIMEOUT_SECONDS))
attempt=0
while :; do
    kill -0 "$WORKER_PID" 2>/dev/null || die "the worker exited before it was ready"
    attempt=$((attempt + 1))
    status_request "demo-ready-$attempt" |
        timeout 5 "$MILLRACER" ops --json --transport nats --nats-url "$NATS_URL" --timeout 4 \
            >"$TMP/ready.json" 2>"$TMP/ready.err" || true
    grep -q '"schema_version"' "$TMP/ready.json" && break
    ((SECONDS < deadline)) || die "the worker did not answer a status request within ${READY_TIMEOUT_SECONDS} s (last: $(tail -n 1 "$TMP/ready.err"))"
    sleep 0.2
done
say "worker ready (answered after $attempt attempt(s))"

# --- 5. frames, live ---------------------------------------------------------------------------
"$MILLRACER" events --follow --nats-url "$NATS_URL" --workspace demo >&2 &
EVENTS_PID=$!
sleep 0.5
say "following frames: millracer events --follow --workspace demo (pid $EVENTS_PID, on stderr)"

# --- 6. a delegated enqueue through the real runtime ------------------------------------------
REQUEST='{"schema_version":"millracer.ops.v0.2","request_id":"demo-enqueue-1","workspace_ref":{"workspace_id":"demo"},"source":{"kind":"cli","surface":"demo"},"action":"enqueue","route_preference":"millrace","intake_preference":"task","input":{"kind":"natural_language","text":"Add a README line that says hello"}}'
say "request:  $REQUEST"
say "command:  echo '<request>' | $MILLRACER ops --json --transport nats --nats-url $NATS_URL"
rc=0
echo "$REQUEST" | "$MILLRACER" ops --json --transport nats --nats-url "$NATS_URL" --timeout 120 \
    >"$TMP/result.json" || rc=$?
kill "$EVENTS_PID" 2>/dev/null || true
wait "$EVENTS_PID" 2>/dev/null || true
say "OpsResult (stdout):"
cat "$TMP/result.json"
say "completion: $(python3 -c 'import json,sys; c=json.load(open(sys.argv[1]))["completion"]; print("outcome", c["outcome"], "scoped_completion", c["scoped_completion"], "verification", c["verification_status"]); [print("  evidence:", json.dumps(e, sort_keys=True)) for e in c["evidence_summary"]]' "$TMP/result.json" 2>&1)"
say "millracer ops exited with status $rc"

# --- 7. health and the queue, readable ----------------------------------------------------------
say "millracer health --workspace-id demo"
"$MILLRACER" health --workspace-id demo --transport nats --nats-url "$NATS_URL" >&2 || rc=$?
say "millracer queue --workspace-id demo"
"$MILLRACER" queue --workspace-id demo --transport nats --nats-url "$NATS_URL" >&2 || rc=$?

if [[ "$KEEP" == 1 ]]; then
    KEEP_RUNNING=1
    disown "$WORKER_PID" "$NATS_PID" 2>/dev/null || true
    cat >&2 <<INFO

demo.sh: MILLRACER_DEMO_KEEP=1: broker and worker keep running.
  nats-server  pid $NATS_PID   url $NATS_URL   log $TMP/nats-server.log
  worker       pid $WORKER_PID   workspace demo = $WORKSPACE   log $TMP/worker.log
Talk to them (every request needs a new request_id; a repeated one returns the stored result):
  echo '${REQUEST/demo-status-1/demo-status-2}' \\
    | HOME=$HOME $MILLRACER ops --json --transport nats --nats-url $NATS_URL
  ($MILLRACER ops --stream-json … prints the event frames too.)
Stop them and clean up:
  kill -TERM $WORKER_PID; sleep 2; kill -TERM $NATS_PID; rm -rf $TMP
INFO
fi
exit "$rc"
