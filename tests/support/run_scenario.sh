#!/usr/bin/env bash
# Run one Millrace scenario end to end against a real `millrace` binary, with
# tests/support/stand_in_pi.py standing in for the `pi` runner (only the
# language model is replaced; the runtime, its stages and records are real).
#
# usage: run_scenario.sh SCENARIO [--millrace BIN] [--dir DIR] [--timeout SECONDS]
#                                 [--stages JSON] [--no-keep]
#
# SCENARIO:
#   task            task completes (builder -> checker -> updater)
#   idea            idea completes (planner -> manager -> builder -> checker -> updater -> arbiter)
#   probe           probe completes (recon -> builder -> checker -> updater)
#   task-blocked    checker answers BLOCKED (troubleshooter/consultant follow) -> tasks/blocked
#   idea-blocked    planner answers BLOCKED (mechanic follows)                -> specs/blocked
#   probe-blocked   recon answers RECON_BLOCKED                                -> probes/blocked
#   crash-restart   daemon SIGKILLed mid-builder, clear-stale-state, restart, task completes
#   stop-restart    `control stop` mid-builder (graceful), restart (strands the task),
#                   clear-stale-state, restart, task completes
#
# --millrace BIN  millrace executable (default: $MILLRACE or `millrace` on PATH; 0.21.1)
# --dir DIR       where to work (default: a new temp dir). Kept afterwards: ws/ (the
#                 workspace), scenario.json, calls.jsonl (stand-in log), daemon*.out,
#                 status-*.json, summary.txt
# --stages JSON   replace the scenario's "stages" map for the first daemon run, e.g.
#                 --stages '{"checker": {"marker": ["FIX_NEEDED", "success"]}}'
#                 (the scenario's own end check may then fail or time out; the
#                 event summary is printed anyway)
# Exit status 0 when the scenario ended the way it should.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STAND_IN="$HERE/stand_in_pi.py"
MILLRACE_BIN="${MILLRACE:-millrace}"
PY="${PYTHON:-python3}"
SCENARIO="${1:-}"
shift || true
DIR=""
STAGES_OVERRIDE=""
TIMEOUT=60
KEEP=1
while [ $# -gt 0 ]; do
  case "$1" in
    --millrace) MILLRACE_BIN="$2"; shift 2 ;;
    --dir) DIR="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --stages) STAGES_OVERRIDE="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --no-keep) KEEP=0; shift ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
case "$SCENARIO" in
  task|idea|probe|task-blocked|idea-blocked|probe-blocked|crash-restart|stop-restart) ;;
  *) sed -n '2,28p' "$0" >&2; exit 2 ;;
esac
command -v "$MILLRACE_BIN" >/dev/null 2>&1 || { echo "millrace binary not found: $MILLRACE_BIN" >&2; exit 2; }
MILLRACE_BIN="$(command -v "$MILLRACE_BIN")"

[ -n "$DIR" ] || DIR="$(mktemp -d "${TMPDIR:-/tmp}/millrace-scenario-$SCENARIO.XXXXXX")"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
W="$DIR/ws"
AG="$W/millrace-agents"
EVENTS="$AG/logs/runtime_events.jsonl"
SCRIPT="$DIR/scenario.json"
CALLS="$DIR/calls.jsonl"
TIMES="$DIR/times.env"
DAEMON_PID=""
: >"$TIMES"

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S.%3N)" "$*" >&2; }
now() { date +%s.%N; }
mr() { "$MILLRACE_BIN" "$@"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", b-a}'; }

cleanup() {
  if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    mr control stop --workspace "$W" >/dev/null 2>&1 || true
    for _ in $(seq 1 100); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$DAEMON_PID" 2>/dev/null; then kill "$DAEMON_PID" 2>/dev/null || true; fi
  fi
  if [ "$KEEP" = 0 ]; then rm -rf "$DIR"; fi
}
trap cleanup EXIT

# ------------------------------------------------------------------ helper (python)
# One place for "has the scenario reached its terminal record?" so that waiting
# and reporting agree. It reads only the runtime's own event log.
cat >"$DIR/scenario_lib.py" <<'PYEOF'
import datetime, json, sys

def load(events_path):
    out = []
    try:
        with open(events_path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return out

def epoch(event):
    return datetime.datetime.fromisoformat(event["occurred_at"]).timestamp()

def terminal(events, scenario, item_id, since=0.0):
    """The runtime event that proves the scenario's end, or None."""
    for e in events:
        if e["event_type"] != "router_decision" or epoch(e) < since:
            continue
        d = e["data"]
        if scenario in ("task", "crash-restart", "stop-restart"):
            if d.get("work_item_id") == item_id and d.get("terminal_result") == "UPDATE_COMPLETE" and d.get("action") == "idle":
                return e
        elif scenario == "idea":
            if d.get("stage") == "arbiter" and d.get("terminal_result") == "ARBITER_COMPLETE" and d.get("action") == "idle":
                return e
        elif scenario == "probe":
            if d.get("terminal_result") == "UPDATE_COMPLETE" and d.get("action") == "idle":
                return e
        elif d.get("action") == "blocked":
            return e
    return None

if __name__ == "__main__":
    events_path, cond, scenario, item_id, since = sys.argv[1:6]
    events = load(events_path)
    if cond.startswith("stage_started:"):
        stage = cond.split(":", 1)[1]
        sys.exit(0 if any(e["event_type"] == "stage_started" and e["data"].get("stage") == stage for e in events) else 1)
    sys.exit(0 if terminal(events, scenario, item_id, float(since)) else 1)
PYEOF

# ------------------------------------------------------------------ workspace
mkdir -p "$W"
log "workspace $W ($("$MILLRACE_BIN" --version 2>/dev/null | tr '\n' ' '))"
mr init --workspace "$W" >"$DIR/init.out"
cat >>"$AG/millrace.toml" <<EOF

[runners.pi]
command = "$STAND_IN"
env = { STAND_IN_PI_SCRIPT = "$SCRIPT" }
EOF
mr compile validate --workspace "$W" --mode default_pi >"$DIR/compile.out"

write_script() { printf '%s\n' "$1" >"$SCRIPT"; }
case "$SCENARIO" in
  task|idea|probe) write_script "{\"log\": \"$CALLS\", \"default_delay_seconds\": 0.0, \"stages\": {}}" ;;
  task-blocked)    write_script "{\"log\": \"$CALLS\", \"stages\": {\"checker\": {\"marker\": \"blocked\"}}}" ;;
  idea-blocked)    write_script "{\"log\": \"$CALLS\", \"stages\": {\"planner\": {\"marker\": \"blocked\"}}}" ;;
  probe-blocked)   write_script "{\"log\": \"$CALLS\", \"stages\": {\"recon\": {\"marker\": \"blocked\"}}}" ;;
  crash-restart)   write_script "{\"log\": \"$CALLS\", \"stages\": {\"builder\": {\"delay_seconds\": 30}}}" ;;
  stop-restart)    write_script "{\"log\": \"$CALLS\", \"stages\": {\"builder\": {\"delay_seconds\": 6}}}" ;;
esac
if [ -n "$STAGES_OVERRIDE" ]; then
  "$PY" - "$SCRIPT" "$STAGES_OVERRIDE" <<'PYEOF'
import json, sys
path, stages = sys.argv[1], json.loads(sys.argv[2])
data = json.load(open(path))
data["stages"] = stages
json.dump(data, open(path, "w"))
PYEOF
fi

# ------------------------------------------------------------------ intake document
# Same shapes as the reference tool's render_task/probe/idea_document.
STAMP="$(date -u +%Y%m%d%H%M%S)"
CREATED="$(date -u +%Y-%m-%dT%H:%M:%S+00:00)"
case "$SCENARIO" in
  task|task-blocked|crash-restart|stop-restart) KIND=task ;;
  idea|idea-blocked) KIND=idea ;;
  probe|probe-blocked) KIND=probe ;;
esac
ITEM_ID="$KIND-$STAMP-stand-in-$SCENARIO"
TITLE="Stand-in $SCENARIO scenario"
DOC="$DIR/$ITEM_ID.md"
case "$KIND" in
  task) cat >"$DOC" <<EOF
# $TITLE

Task-ID: $ITEM_ID
Title: $TITLE
Summary: Exercise the $SCENARIO scenario with the stand-in pi runner.
Created-At: $CREATED
Created-By: millracer

Scoped-Work:
- Item-ID: none

Target-Paths:
- .

Acceptance:
- Complete the requested implementation work or report the concrete blocker.

Required-Checks:
- Run the relevant verification for the changed work, or explain why no check was possible.

References:
- queued by Millracer

Risk:
- This task may need follow-up inspection by the outer Millracer agent.
EOF
  ;;
  idea) cat >"$DOC" <<EOF
# $TITLE

Idea-ID: $ITEM_ID
Title: $TITLE
Desired-Outcome: Exercise the $SCENARIO scenario with the stand-in pi runner.
Created-At: $CREATED
Created-By: millracer

Scoped-Work:
- Item-ID: none

Operator-Visible-Value:
- Preserve the requested outcome and make the work actionable.

Constraints:
- Do not expand into unrelated work items.

Acceptance-Intent:
- Shape the idea into clear implementation slices and verification expectations.

Planning-Intent:
- Decompose only as needed to make downstream execution safe and reviewable.

References:
- queued by Millracer
EOF
  ;;
  probe) cat >"$DOC" <<EOF
# $TITLE

Probe-ID: $ITEM_ID
Title: $TITLE
Summary: Exercise the $SCENARIO scenario with the stand-in pi runner.
Request: Exercise the $SCENARIO scenario with the stand-in pi runner.
Created-At: $CREATED
Created-By: millracer

Scoped-Work:
- Item-ID: none

Target-Paths:
- .

Constraints:
- Do not implement code changes during this probe stage.

Recon-Questions:
- Is this one execution task, or does it need planning/decomposition?

Expected-Output:
- Recon packet summarizing findings and candidate files.

Acceptance:
- Produce a recon packet, route recommendation, and downstream work shape.

Risk-Notes:
- Acting before reconnaissance may miss repository conventions or regression risks.

References:
- queued by Millracer
EOF
  ;;
esac
mr queue "add-$KIND" "$DOC" --workspace "$W" >"$DIR/queue.out"
log "queued $KIND $ITEM_ID: $(tr '\n' ' ' <"$DIR/queue.out")"

# ------------------------------------------------------------------ daemon helpers
start_daemon() {
  # Start the binary itself in the background: `mr ... &` would fork a subshell
  # and $! would be that subshell, not the daemon (SIGKILL would miss it).
  "$MILLRACE_BIN" run daemon --workspace "$W" --mode default_pi --monitor none >"$1" 2>&1 &
  DAEMON_PID=$!
  log "daemon pid $DAEMON_PID"
}

STOP_SECONDS=""
stop_daemon() {
  local t0; t0=$(now)
  mr control stop --workspace "$W" >"$DIR/stop.out"
  # A running stage is finished before the daemon exits: allow up to TIMEOUT.
  for _ in $(seq 1 $((TIMEOUT * 20))); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.05; done
  if kill -0 "$DAEMON_PID" 2>/dev/null; then log "daemon did not exit after stop"; return 1; fi
  wait "$DAEMON_PID" 2>/dev/null || true
  STOP_SECONDS="$(elapsed "$t0" "$(now)")"
  log "daemon exited $STOP_SECONDS s after control stop"
  DAEMON_PID=""
}

wait_for() {  # wait_for stage_started:<stage> | terminal
  local deadline=$(( $(date +%s) + TIMEOUT ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    if "$PY" "$DIR/scenario_lib.py" "$EVENTS" "$1" "$SCENARIO" "$ITEM_ID" "${T_START:-0}"; then return 0; fi
    sleep 0.1
  done
  log "timed out after ${TIMEOUT}s waiting for $1"
  return 1
}

status_to() { mr status --workspace "$W" --format json >"$DIR/$1" 2>/dev/null || true; }

# ------------------------------------------------------------------ run
T_START=$(now)
start_daemon "$DIR/daemon.out"
case "$SCENARIO" in
  crash-restart)
    wait_for stage_started:builder
    sleep 1
    log "SIGKILL daemon $DAEMON_PID mid-builder"
    kill -9 "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true; DAEMON_PID=""
    sleep 0.5
    status_to status-after-kill.json
    mr control clear-stale-state --workspace "$W" >"$DIR/clear-stale-state.out" 2>&1 || true
    log "clear-stale-state: $(tr '\n' ' ' <"$DIR/clear-stale-state.out")"
    status_to status-after-clear.json
    write_script "{\"log\": \"$CALLS\", \"stages\": {}}"   # mid-run change: builder answers at once
    T_START=$(now)
    start_daemon "$DIR/daemon-restart.out"
    ;;
  stop-restart)
    wait_for stage_started:builder
    sleep 1
    log "control stop mid-builder (stage delay 6 s)"
    stop_daemon
    echo "STOP_MID_STAGE_SECONDS=$STOP_SECONDS" >>"$TIMES"
    status_to status-after-stop.json
    write_script "{\"log\": \"$CALLS\", \"stages\": {}}"
    start_daemon "$DIR/daemon-restart1.out"
    for _ in $(seq 1 80); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$DAEMON_PID" 2>/dev/null; then
      log "restarted daemon still running after 8 s"; stop_daemon
    else
      wait "$DAEMON_PID" 2>/dev/null || true; DAEMON_PID=""
      log "restarted daemon exited by itself within 8 s"
    fi
    status_to status-after-restart1.json
    log "task files: $(cd "$AG/tasks" && find . -type f | tr '\n' ' ')"
    mr control clear-stale-state --workspace "$W" >"$DIR/clear-stale-state.out" 2>&1 || true
    log "clear-stale-state: $(tr '\n' ' ' <"$DIR/clear-stale-state.out")"
    status_to status-after-clear.json
    T_START=$(now)
    start_daemon "$DIR/daemon-restart2.out"
    ;;
esac
RC=0
wait_for terminal || RC=1
T_SEEN=$(now)
sleep 1.5   # let the daemon settle (idle tick) before reading status
status_to status-final.json
stop_daemon || RC=1
{
  echo "T_START=$T_START"
  echo "T_SEEN=$T_SEEN"
  echo "STOP_IDLE_SECONDS=$STOP_SECONDS"
} >>"$TIMES"

# ------------------------------------------------------------------ report
"$PY" - "$DIR" "$EVENTS" "$AG" "$SCENARIO" "$ITEM_ID" <<'PYEOF' | tee "$DIR/summary.txt"
import json, pathlib, sys
d, events_path, agents, scenario, item_id = sys.argv[1:6]
sys.path.insert(0, d)
import scenario_lib as lib
times = dict(line.split("=", 1) for line in pathlib.Path(d, "times.env").read_text().split() if "=" in line)
t_start, t_seen = float(times["T_START"]), float(times["T_SEEN"])
events = lib.load(events_path)
term = lib.terminal(events, scenario, item_id, t_start - 1)
starts = [e for e in events if e["event_type"] == "runtime_started" and lib.epoch(e) >= t_start - 1]
print(f"scenario: {scenario}   intake id: {item_id}")
if term is not None:
    t_term = lib.epoch(term)
    line = f"timing: spawn->terminal event {t_term - t_start:.2f}s"
    if starts:
        line += f" (spawn->runtime_started {lib.epoch(starts[0]) - t_start:.2f}s, runtime_started->terminal {t_term - lib.epoch(starts[0]):.2f}s)"
    line += f"; terminal event seen by poller +{t_seen - t_term:.2f}s"
    print(line)
else:
    print("timing: no terminal event")
for key in ("STOP_MID_STAGE_SECONDS", "STOP_IDLE_SECONDS"):
    if times.get(key):
        print(f"{key.lower()}: {times[key]}")
keys = ("stage", "work_item_kind", "work_item_id", "terminal_result", "action", "failure_class", "reason", "run_id", "spec_id")
first = lib.epoch(events[0]) if events else 0
print("runtime_events.jsonl:")
for e in events:
    if e["event_type"] == "capability_gate_evaluated":
        continue
    data = {k: e["data"][k] for k in keys if e["data"].get(k) is not None}
    if "run_id" in data:
        data["run_id"] = data["run_id"][:12]
    print(f"  +{lib.epoch(e) - first:6.2f}s {e['event_type']:<34} {json.dumps(data)}")
ag = pathlib.Path(agents)
print("work items on disk:")
for family in ("tasks", "specs", "probes", "incidents", "arbiter/targets", "arbiter/verdicts"):
    base = ag / family
    if base.is_dir():
        for p in sorted(base.rglob("*")):
            if p.is_file():
                print(f"  {p.relative_to(ag)}")
pick = ("process_running", "runtime_ownership_lock", "stop_requested", "active_run_count", "active_stage",
        "active_work_item_id", "execution_queue_depth", "planning_queue_depth", "execution_status_marker",
        "planning_status_marker", "current_failure_class", "blocked_idle", "closure_target_root_spec_id",
        "closure_target_open")
for name in ("status-after-kill.json", "status-after-stop.json", "status-after-restart1.json",
             "status-after-clear.json", "status-final.json"):
    path = pathlib.Path(d, name)
    if path.exists():
        try:
            s = json.loads(path.read_text())
            print(f"{name}: {json.dumps({k: s.get(k) for k in pick})}")
        except ValueError:
            print(f"{name}: unreadable")
calls = pathlib.Path(d, "calls.jsonl")
if calls.exists():
    rows = [json.loads(l) for l in calls.read_text().splitlines() if l.strip()]
    shown = ", ".join(
        f"{r['stage']}={r['marker'] or '<empty>'}" + ("" if r.get("event", "started") == "started" else f"[{r['event']}]")
        for r in rows[:30])
    print(f"stand-in calls ({len(rows)}): {shown}{' ...' if len(rows) > 30 else ''}")
PYEOF

# ------------------------------------------------------------------ verdict
check() { if eval "$1"; then log "ok: $2"; else log "FAILED: $2"; RC=1; fi; }
case "$SCENARIO" in
  task|crash-restart|stop-restart) check "[ -f '$AG/tasks/done/$ITEM_ID.md' ]" "task in tasks/done" ;;
  task-blocked)  check "[ -f '$AG/tasks/blocked/$ITEM_ID.md' ]" "task in tasks/blocked" ;;
  idea)          check "grep -q '\"closure_open\": false' '$AG'/arbiter/targets/*.json" "arbiter target closed" ;;
  idea-blocked)  check "ls '$AG'/specs/blocked/*.md >/dev/null 2>&1" "spec in specs/blocked" ;;
  probe)         check "[ -f '$AG/probes/done/$ITEM_ID.md' ] && ls '$AG'/tasks/done/*.md >/dev/null 2>&1" "probe done and its task done" ;;
  probe-blocked) check "[ -f '$AG/probes/blocked/$ITEM_ID.md' ]" "probe in probes/blocked" ;;
esac
log "scenario $SCENARIO: $([ "$RC" = 0 ] && echo PASS || echo FAIL) (artifacts in $DIR)"
exit "$RC"
