#!/usr/bin/env bash
# Run one Millrace scenario end to end against a real `millrace` binary, with
# tests/support/stand_in_pi.py standing in for the `pi` runner (the language
# model is the only thing replaced).
#
# usage: run_scenario.sh SCENARIO [--millrace BIN] [--dir DIR] [--timeout SECONDS] [--keep]
#
# SCENARIO is one of:
#   task            task completes (builder -> checker -> updater)
#   idea            idea completes (planner -> manager -> builder -> checker -> updater -> arbiter)
#   probe           probe completes (recon -> builder -> checker -> updater)
#   task-blocked    checker answers BLOCKED; troubleshooter/consultant answer BLOCKED
#   idea-blocked    planner answers BLOCKED
#   probe-blocked   recon answers RECON_BLOCKED
#   crash-restart   daemon SIGKILLed mid-builder, clear-stale-state, restart, task completes
#   stop-restart    `control stop` mid-builder (graceful), restart (strands the task),
#                   clear-stale-state, restart, task completes
#
# --stages JSON replaces the scenario's "stages" map for the (first) daemon run,
# e.g. --stages '{"checker": {"marker": "blocked"}}' (then the blocked scenarios'
# completion check may time out; the event summary is still printed).
#
# BIN defaults to $MILLRACE or `millrace` on PATH (millrace-ai 0.21.1).
# DIR defaults to a new temp dir; it keeps ws/ (the workspace), scenario.json,
# calls.jsonl (stand-in log), daemon*.out and summary.txt.
# Exit status 0 when the scenario ended the way it should.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STAND_IN="$HERE/stand_in_pi.py"
MILLRACE_BIN="${MILLRACE:-millrace}"
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
  *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
command -v "$MILLRACE_BIN" >/dev/null 2>&1 || { echo "millrace binary not found: $MILLRACE_BIN" >&2; exit 2; }
PY="${PYTHON:-python3}"

[ -n "$DIR" ] || DIR="$(mktemp -d "${TMPDIR:-/tmp}/millrace-scenario-$SCENARIO.XXXXXX")"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
W="$DIR/ws"
AG="$W/millrace-agents"
EVENTS="$AG/logs/runtime_events.jsonl"
SCRIPT="$DIR/scenario.json"
CALLS="$DIR/calls.jsonl"
DAEMON_PID=""

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S.%3N)" "$*" >&2; }
now() { date +%s.%N; }
mr() { "$MILLRACE_BIN" "$@"; }

cleanup() {
  if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    mr control stop --workspace "$W" >/dev/null 2>&1 || true
    for _ in $(seq 1 50); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$DAEMON_PID" 2>/dev/null && kill "$DAEMON_PID" 2>/dev/null || true
  fi
  if [ "$KEEP" = 0 ]; then rm -rf "$DIR"; fi
}
trap cleanup EXIT

# ---------------------------------------------------------------- workspace
mkdir -p "$W"
log "workspace $W"
mr init --workspace "$W" >"$DIR/init.out"
cat >>"$AG/millrace.toml" <<EOF

[runners.pi]
command = "$STAND_IN"
env = { STAND_IN_PI_SCRIPT = "$SCRIPT" }
EOF
mr compile validate --workspace "$W" --mode default_pi >"$DIR/compile.out"

write_script() { printf '%s\n' "$1" >"$SCRIPT"; }
override_stages() {
  [ -n "$STAGES_OVERRIDE" ] || return 0
  "$PY" - "$SCRIPT" "$STAGES_OVERRIDE" <<'PYEOF'
import json, sys
path, stages = sys.argv[1], json.loads(sys.argv[2])
data = json.load(open(path))
data["stages"] = stages
json.dump(data, open(path, "w"))
PYEOF
}
case "$SCENARIO" in
  task|idea|probe)
    write_script "{\"log\": \"$CALLS\", \"default_delay_seconds\": 0.0, \"stages\": {}}" ;;
  task-blocked)
    write_script "{\"log\": \"$CALLS\", \"stages\": {\"checker\": {\"marker\": \"blocked\"}}}" ;;
  idea-blocked)
    write_script "{\"log\": \"$CALLS\", \"stages\": {\"planner\": {\"marker\": \"blocked\"}}}" ;;
  probe-blocked)
    write_script "{\"log\": \"$CALLS\", \"stages\": {\"recon\": {\"marker\": \"blocked\"}}}" ;;
  crash-restart|stop-restart)
    write_script "{\"log\": \"$CALLS\", \"stages\": {\"builder\": {\"delay_seconds\": $([ "$SCENARIO" = stop-restart ] && echo 6 || echo 30)}}}" ;;
esac
override_stages

# ---------------------------------------------------------------- intake doc
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

# ---------------------------------------------------------------- helpers
start_daemon() {
  local out="$1"
  # run the binary itself in the background (not the `mr` shell function, which
  # would fork a subshell: $! would then be the subshell, not the daemon)
  "$MILLRACE_BIN" run daemon --workspace "$W" --mode default_pi --monitor none >"$out" 2>&1 &
  DAEMON_PID=$!
  log "daemon pid $DAEMON_PID"
}

stop_daemon() {
  local t0; t0=$(now)
  mr control stop --workspace "$W" >"$DIR/stop.out"
  # the daemon finishes a running stage before it exits: allow up to TIMEOUT
  for _ in $(seq 1 $((TIMEOUT * 20))); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.05; done
  if kill -0 "$DAEMON_PID" 2>/dev/null; then log "daemon did not exit after stop"; return 1; fi
  wait "$DAEMON_PID" 2>/dev/null || true
  log "daemon exited $(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}') s after control stop"
  DAEMON_PID=""
}

# wait_for CONDITION: polls the runtime's own event log (cheap, no CLI call).
# Conditions: stage_started:<stage> | terminal (see terminal_check below)
wait_for() {
  local cond="$1" deadline=$(( $(date +%s) + TIMEOUT ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    if "$PY" - "$EVENTS" "$cond" "$SCENARIO" "$ITEM_ID" "$AG" <<'PYEOF'
import json, sys, pathlib
events_path, cond, scenario, item_id, agents = sys.argv[1:6]
events = []
try:
    for line in open(events_path, encoding="utf-8"):
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
except OSError:
    sys.exit(1)
def ev(kind, **kw):
    return [e for e in events if e["event_type"] == kind and all(e["data"].get(k) == v for k, v in kw.items())]
if cond.startswith("stage_started:"):
    sys.exit(0 if ev("stage_started", stage=cond.split(":", 1)[1]) else 1)
# terminal: the runtime's own completion / block record for this scenario
ag = pathlib.Path(agents)
if scenario in ("task", "crash-restart", "stop-restart"):
    ok = bool(ev("router_decision", work_item_id=item_id, terminal_result="UPDATE_COMPLETE", action="idle"))
elif scenario == "idea":
    ok = bool(ev("router_decision", stage="arbiter", terminal_result="ARBITER_COMPLETE", action="idle"))
elif scenario == "probe":
    ok = any(e["data"].get("terminal_result") == "UPDATE_COMPLETE" for e in ev("router_decision", action="idle"))
else:  # blocked scenarios: a router_decision with action=blocked for a root-level item
    ok = bool(ev("router_decision", action="blocked"))
sys.exit(0 if ok else 1)
PYEOF
    then return 0; fi
    sleep 0.1
  done
  log "timed out waiting for $cond"
  return 1
}

# ---------------------------------------------------------------- run
T_START=$(now)
start_daemon "$DIR/daemon.out"
if [ "$SCENARIO" = crash-restart ]; then
  wait_for stage_started:builder
  sleep 1
  log "SIGKILL daemon $DAEMON_PID mid-builder"
  kill -9 "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true; DAEMON_PID=""
  sleep 0.5
  mr status --workspace "$W" --format json >"$DIR/status-after-kill.json" || true
  mr control clear-stale-state --workspace "$W" >"$DIR/clear-stale-state.out" 2>&1 || true
  mr status --workspace "$W" --format json >"$DIR/status-after-clear.json" || true
  # scenario change mid-run: the next builder call answers at once
  write_script "{\"log\": \"$CALLS\", \"stages\": {}}"
  T_START=$(now)
  start_daemon "$DIR/daemon-restart.out"
fi
if [ "$SCENARIO" = stop-restart ]; then
  wait_for stage_started:builder
  sleep 1
  t0=$(now)
  log "control stop mid-builder"
  stop_daemon   # returns once the daemon has exited: it finishes the running stage first
  log "stop took $(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}') s (stage delay 6 s)"
  mr status --workspace "$W" --format json >"$DIR/status-after-stop.json" || true
  # scenario change: builder no longer waits
  write_script "{\"log\": \"$CALLS\", \"stages\": {}}"
  start_daemon "$DIR/daemon-restart1.out"
  for _ in $(seq 1 80); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$DAEMON_PID" 2>/dev/null; then
    log "restarted daemon still running after 8 s"
    stop_daemon
  else
    wait "$DAEMON_PID" 2>/dev/null || true
    log "restarted daemon exited by itself within 8 s"
    DAEMON_PID=""
  fi
  mr status --workspace "$W" --format json >"$DIR/status-after-restart1.json" || true
  log "task files: $(cd "$AG/tasks" && find . -type f | tr '\n' ' ')"
  mr control clear-stale-state --workspace "$W" >"$DIR/clear-stale-state.out" 2>&1 || true
  log "clear-stale-state: $(tr '\n' ' ' <"$DIR/clear-stale-state.out")"
  T_START=$(now)
  start_daemon "$DIR/daemon-restart2.out"
fi
RC=0
wait_for terminal || RC=1
T_TERMINAL=$(now)
sleep 1.5   # let the daemon write its idle tick before we read status
mr status --workspace "$W" --format json >"$DIR/status-final.json" || true
stop_daemon || RC=1

# ---------------------------------------------------------------- report
"$PY" - "$EVENTS" "$AG" "$DIR" "$T_START" "$T_TERMINAL" "$SCENARIO" "$ITEM_ID" <<'PYEOF' | tee "$DIR/summary.txt"
import json, sys, pathlib, datetime
events_path, agents, d, t_start, t_term, scenario, item_id = sys.argv[1:8]
ag = pathlib.Path(agents)
print(f"scenario: {scenario}  intake id: {item_id}")
print(f"daemon start -> terminal seen: {float(t_term) - float(t_start):.2f} s")
keys = ("stage", "work_item_kind", "work_item_id", "terminal_result", "action", "failure_class", "reason", "run_id")
first = None
for line in open(events_path, encoding="utf-8"):
    e = json.loads(line)
    t = datetime.datetime.fromisoformat(e["occurred_at"])
    first = first or t
    data = {k: e["data"][k] for k in keys if e["data"].get(k) is not None}
    if "run_id" in data:
        data["run_id"] = data["run_id"][:12]
    print(f"  +{(t - first).total_seconds():6.2f}s {e['event_type']:<34} {json.dumps(data)}")
print("work items on disk:")
for family in ("tasks", "specs", "probes", "incidents"):
    base = ag / family
    if not base.is_dir():
        continue
    for p in sorted(base.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(ag)}")
for p in sorted((ag / "arbiter").rglob("*")) if (ag / "arbiter").is_dir() else []:
    if p.is_file():
        print(f"  {p.relative_to(ag)}")
status_path = pathlib.Path(d) / "status-final.json"
try:
    s = json.loads(status_path.read_text())
    pick = ("process_running", "runtime_ownership_lock", "active_run_count", "active_stage", "active_work_item_id",
            "execution_queue_depth", "planning_queue_depth", "execution_status_marker", "planning_status_marker",
            "current_failure_class", "blocked_idle", "closure_target_root_spec_id", "closure_target_open")
    print("status (before stop):", json.dumps({k: s.get(k) for k in pick}))
except Exception as exc:
    print("status unavailable:", exc)
calls = pathlib.Path(d) / "calls.jsonl"
if calls.exists():
    lines = calls.read_text().splitlines()
    shown = ", ".join(f"{json.loads(l)['stage']}={json.loads(l)['marker']}" for l in lines[:30])
    print(f"stand-in calls ({len(lines)}):", shown + (" ..." if len(lines) > 30 else ""))
PYEOF

# ---------------------------------------------------------------- verdict
check() { if eval "$1"; then log "ok: $2"; else log "FAILED: $2"; RC=1; fi; }
case "$SCENARIO" in
  task|crash-restart|stop-restart) check "[ -f '$AG/tasks/done/$ITEM_ID.md' ]" "task in tasks/done" ;;
  task-blocked) check "[ -f '$AG/tasks/blocked/$ITEM_ID.md' ]" "task in tasks/blocked" ;;
  idea) check "grep -q '\"closure_open\": false' '$AG'/arbiter/targets/*.json" "arbiter target closed" ;;
  idea-blocked) check "ls '$AG'/specs/blocked/*.md >/dev/null 2>&1" "spec in specs/blocked" ;;
  probe) check "[ -f '$AG/probes/done/$ITEM_ID.md' ] && ls '$AG'/tasks/done/*.md >/dev/null 2>&1" "probe done and its task done" ;;
  probe-blocked) check "[ -f '$AG/probes/blocked/$ITEM_ID.md' ]" "probe in probes/blocked" ;;
esac
log "scenario $SCENARIO: $([ $RC = 0 ] && echo PASS || echo FAIL) (artifacts in $DIR)"
exit $RC
