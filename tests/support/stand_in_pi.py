#!/usr/bin/env python3
"""Stand-in for `pi --mode rpc` used by millracer tests.

The real Millrace runtime (millrace-ai 0.21.1, mode `default_pi`) runs every
stage as `<[runners.pi] command> [args] --mode rpc --no-session --model M
--thinking T --no-context-files --no-skills`, cwd = the workspace root, env =
the daemon's env plus `[runners.pi] env`, and talks pi's RPC JSON-lines protocol
on stdin/stdout (ids `prompt-1`, `last-assistant-1`, `session-stats-1`). This
script replaces only the language model: it answers that protocol, detects the
stage from the prompt (`Stage: <name>` line), performs the stage's file duties
(planner disposition, manager task card, arbiter verdict/rubric/report, recon
packet + generated task/spec) and replies with one legal terminal marker.

Scenario control: env STAND_IN_PI_SCRIPT names a JSON file, re-read on every
prompt (a test may rewrite it mid-run):

    {
      "default_marker": "success",         # optional, default "success"
      "default_delay_seconds": 0.0,         # optional
      "recovery_follows_faults": true,      # optional, default true (see below)
      "log": "/abs/path/calls.jsonl",       # optional, one line per call
      "stages": {
        "checker": {"marker": "blocked", "delay_seconds": 3},
        "builder": {"marker": ["### BLOCKED", "success"]},  # n-th call -> n-th item
        "updater": {"reply": "not a marker"},                # raw assistant text
        "fixer":   {"crash": true},                          # exit 1 mid-protocol
        "manager": {"hold_until": "/abs/path/release"}       # wait for the file
      }
    }

`marker`: "success" (first legal marker), "blocked" (the stage's own
`<STAGE>_BLOCKED` marker when legal, i.e. `### RECON_BLOCKED` for recon, else
`### BLOCKED`), or an exact marker (`### CHECKER_PASS` or `CHECKER_PASS`). A
list picks the item by call number for that stage (last item repeats; counting
uses "log"). `delay_seconds` sleeps after the prompt is acknowledged and before
the duties/answer; `hold_until` names a file: the stage waits (after any delay)
until the file exists, so a test holds a run mid-stage and releases it when it
has seen what it waits for, instead of guessing a delay long enough. If the
runtime dies meanwhile the stand-in exits without doing anything. When any other stage is faulted (blocked marker, reply, crash)
the unconfigured recovery stages troubleshooter, consultant and mechanic answer
blocked too, so the run ends blocked instead of looping forever.

Log lines: {"event": "started"|"abandoned"|"crashed", "stage", "marker", "text",
"legal", "pid", "ppid", "time", "unix_time", "delay_seconds", "run_id",
"request_id", "work_item", "call_index"}; "started" is written when the prompt
arrives. No env var: every stage succeeds at once.

Python 3.11 standard library only. Never raises on unexpected input: a prompt
without legal markers gets an empty answer (and a note on stderr).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCRIPT_ENV = "STAND_IN_PI_SCRIPT"
DEBUG_ENV = "STAND_IN_PI_DEBUG_LOG"  # optional: file for internal diagnostics

_MARKER_RE = re.compile(r"###\s+[A-Z0-9_]+")
_SAFE_ID_RE = re.compile(r"[^A-Za-z0-9._-]+")

_ORIGINAL_PPID = os.getppid()


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _debug(message: str) -> None:
    path = os.environ.get(DEBUG_ENV)
    line = f"{_now_iso()} stand_in_pi[{os.getpid()}] {message}\n"
    try:
        if path:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(line)
        else:
            sys.stderr.write(line)
            sys.stderr.flush()
    except Exception:
        pass


def _write(payload: dict[str, Any]) -> None:
    try:
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, OSError, ValueError):
        # the runtime went away; nothing left to talk to
        _exit_quietly(0)


def _exit_quietly(code: int) -> None:
    try:
        sys.stdout.flush()
    except Exception:
        pass
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except Exception:
        pass
    os._exit(code)


def _parent_gone() -> bool:
    return os.getppid() != _ORIGINAL_PPID


def _safe_id(value: str) -> str:
    cleaned = _SAFE_ID_RE.sub("-", value).strip("-.")
    if not cleaned or not cleaned[0].isalnum():
        cleaned = "x" + cleaned
    return cleaned[:120]


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_json(path: Path, payload: Any) -> None:
    _write_text(path, json.dumps(payload, indent=2) + "\n")


# --------------------------------------------------------------------------
# scenario file
# --------------------------------------------------------------------------


def _load_scenario() -> dict[str, Any]:
    path = os.environ.get(SCRIPT_ENV)
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except Exception as exc:  # a test may be rewriting it right now
        _debug(f"cannot read scenario {path}: {exc}")
        return {}


def _stage_settings(scenario: dict[str, Any], stage: str) -> dict[str, Any]:
    stages = scenario.get("stages")
    if isinstance(stages, dict):
        entry = stages.get(stage)
        if isinstance(entry, dict):
            return entry
        if isinstance(entry, str):  # shorthand: "checker": "blocked"
            return {"marker": entry}
    return {}


RECOVERY_STAGES = ("troubleshooter", "consultant", "mechanic")


def _is_fault(entry: Any) -> bool:
    """Does a stage entry inject a failure (blocked marker, raw reply, crash)?"""
    if isinstance(entry, str):
        entry = {"marker": entry}
    if not isinstance(entry, dict):
        return False
    if entry.get("crash") or isinstance(entry.get("reply"), str):
        return True
    markers = entry.get("marker")
    if not isinstance(markers, list):
        markers = [markers]
    return any(isinstance(m, str) and m.strip().upper().endswith("BLOCKED") for m in markers)


def _recovery_follows(scenario: dict[str, Any], stage: str) -> bool:
    """Unconfigured recovery stages answer blocked when another stage is faulted.

    Without this the runtime's recovery loop (troubleshooter -> builder -> checker
    -> consultant -> ...) never ends. Turn off with "recovery_follows_faults": false.
    """
    if stage not in RECOVERY_STAGES or scenario.get("recovery_follows_faults", True) is False:
        return False
    stages = scenario.get("stages")
    if not isinstance(stages, dict) or stage in stages:
        return False
    return any(name not in RECOVERY_STAGES and _is_fault(entry) for name, entry in stages.items())


def _previous_calls(log_path: str | None, stage: str) -> int:
    if not log_path:
        return 0
    count = 0
    try:
        with open(log_path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                    if entry.get("stage") == stage and entry.get("event", "started") == "started":
                        count += 1
                except Exception:
                    continue
    except OSError:
        return 0
    return count


def _append_log(log_path: str | None, record: dict[str, Any]) -> None:
    if not log_path:
        return
    try:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
    except Exception as exc:
        _debug(f"cannot append log {log_path}: {exc}")


# --------------------------------------------------------------------------
# prompt parsing
# --------------------------------------------------------------------------


class Prompt:
    """Fields of one Millrace stage prompt (see millrace_ai/runners/requests.py)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.fields: dict[str, str] = {}
        for line in text.splitlines():
            match = re.match(r"^([A-Z][A-Za-z ]*?):\s(.*)$", line)
            if match and match.group(1) not in self.fields:
                self.fields[match.group(1)] = match.group(2).strip()
        self.legal_markers = self._legal_markers()
        self.stage = self._stage()

    def get(self, key: str) -> str | None:
        value = self.fields.get(key)
        if value is None or value == "none" or value == "":
            return None
        return value

    def _legal_markers(self) -> list[str]:
        for line in self.text.splitlines():
            if line.startswith("Legal markers for this stage:"):
                found = _MARKER_RE.findall(line)
                if found:
                    return [_normalize_marker(m) for m in found]
        lines = self.text.splitlines()
        for index, line in enumerate(lines):
            if line.strip() == "Legal Terminal Markers:":
                found = []
                for item in lines[index + 1 :]:
                    if not item.startswith("- "):
                        break
                    found.extend(_MARKER_RE.findall(item))
                if found:
                    return [_normalize_marker(m) for m in found]
        seen: list[str] = []
        for marker in _MARKER_RE.findall(self.text):
            marker = _normalize_marker(marker)
            if marker not in seen:
                seen.append(marker)
        return seen

    def _stage(self) -> str:
        stage = self.get("Stage")
        if stage:
            return stage.strip().lower()
        entry = self.get("Entrypoint Path") or ""
        name = Path(entry).stem
        if name:
            return name.removeprefix("lad_").lower()
        match = re.search(r"You are the `([A-Za-z_]+)` stage", self.text)
        if match:
            return match.group(1).lower()
        return "unknown"

    # "Active Work Item: task my-task-id"
    def active_work_item(self) -> tuple[str | None, str | None]:
        value = self.get("Active Work Item")
        if not value:
            return None, None
        parts = value.split()
        if len(parts) >= 2 and parts[0] != "none" and parts[1] != "none":
            return parts[0], parts[1]
        return None, None


def _normalize_marker(marker: str) -> str:
    marker = marker.strip().strip("`").strip()
    if not marker.startswith("###"):
        marker = "### " + marker
    return "### " + marker[3:].strip()


def _choose_marker(prompt: Prompt, wanted: str) -> str:
    legal = prompt.legal_markers
    wanted = (wanted or "success").strip()
    if wanted.lower() == "success":
        return legal[0] if legal else ""
    if wanted.lower() == "blocked":
        own = f"### {prompt.stage.upper()}_BLOCKED"
        if own in legal:
            return own
        if "### BLOCKED" in legal:
            return "### BLOCKED"
        for marker in legal:
            if marker.endswith("BLOCKED"):
                return marker
        return "### BLOCKED"
    return _normalize_marker(wanted)


# --------------------------------------------------------------------------
# workspace paths
# --------------------------------------------------------------------------


class Workspace:
    def __init__(self, prompt: Prompt) -> None:
        run_dir = prompt.get("Run Directory")
        self.run_dir = Path(run_dir) if run_dir else None
        agents: Path | None = None
        if self.run_dir is not None and self.run_dir.parent.name == "runs":
            agents = self.run_dir.parent.parent
        if agents is None:
            agents = Path.cwd() / "millrace-agents"
        self.agents = agents
        self.root = agents.parent
        if self.run_dir is None:
            self.run_dir = agents / "runs" / "latest"

    def resolve(self, value: str | None) -> Path | None:
        if not value:
            return None
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = self.root / path
        return path

    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def task_exists(self, task_id: str) -> bool:
        for state in ("queue", "active", "done", "blocked"):
            folder = self.agents / "tasks" / state
            if (folder / f"{task_id}.md").exists() or (folder / f"{task_id}.md.invalid").exists():
                return True
        return False

    def spec_exists(self, spec_id: str) -> bool:
        for state in ("queue", "active", "done", "blocked"):
            if (self.agents / "specs" / state / f"{spec_id}.md").exists():
                return True
        return False


def _read_doc_fields(path: Path | None) -> tuple[str | None, dict[str, str]]:
    """Title and scalar `Label: value` fields of a markdown work document."""
    if path is None:
        return None, {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None, {}
    title = None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if title is None and line.startswith("# "):
            title = line[2:].strip()
            continue
        match = re.match(r"^([A-Za-z][A-Za-z0-9-]*):\s+(\S.*)$", line.strip())
        if match and match.group(1) not in fields:
            fields[match.group(1)] = match.group(2).strip()
    return title, fields


def _unique(base: str, exists) -> str:
    candidate = base
    counter = 2
    while exists(candidate):
        candidate = f"{base}-{counter}"
        counter += 1
    return candidate


# --------------------------------------------------------------------------
# stage duties
# --------------------------------------------------------------------------


def _duty_planner(prompt: Prompt, ws: Workspace, marker: str) -> list[str]:
    family, work_id = prompt.active_work_item()
    blocked = marker == "### BLOCKED"
    disposition = {
        "schema_version": "1.0",
        "kind": "planner_disposition",
        "source_work_item_family_id": family if family in ("spec", "incident") else "spec",
        "source_work_item_id": work_id or "unknown",
        "disposition": "blocked" if blocked else "active_source_ready_for_manager",
        "emitted_spec_ids": [],
        "refined_active_source": False,
        "recommended_next_action": (
            "operator must resolve the planning blocker" if blocked else "manager decomposes the active spec"
        ),
        "created_at": _now_iso(),
        "created_by": "planner",
    }
    path = ws.run_dir / "planner_disposition.json"
    _write_json(path, disposition)
    summary = ws.run_dir / "planner_summary.md"
    _write_text(summary, f"# Planner summary\n\nInput: {family} {work_id}\nDisposition: {disposition['disposition']}\n")
    return [str(path), str(summary)]


def _duty_manager(prompt: Prompt, ws: Workspace, marker: str) -> list[str]:
    if marker != "### MANAGER_COMPLETE":
        return []
    family, work_id = prompt.active_work_item()
    spec_path = ws.resolve(prompt.get("Active Work Item Path"))
    title, spec = _read_doc_fields(spec_path)
    is_incident = family == "incident"
    source_label = "Incident-ID" if is_incident else "Spec-ID"
    spec_id = spec.get(source_label) or work_id or "spec"
    task_id = _unique(_safe_id(f"{spec_id}-task-1"), ws.task_exists)
    task_title = f"Implement {title or spec_id}"
    lineage = []
    for label in ("Root-Idea-ID", "Root-Spec-ID", "Root-Intake-Kind", "Root-Intake-ID"):
        value = spec.get(label)
        if label == "Root-Spec-ID" and not value and not is_incident:
            value = spec_id  # a root spec is its own root
        if value:
            lineage.append(f"{label}: {value}")
    now = _now_iso()
    card = "\n".join(
        [
            f"# {task_title}",
            "",
            f"Task-ID: {task_id}",
            f"Title: {task_title}",
            f"Summary: Stand-in manager task for spec {spec_id}.",
            *lineage,
            f"{source_label}: {spec_id}",
            "Status-Hint: queued",
            f"Created-At: {now}",
            "Created-By: manager",
            f"Updated-At: {now}",
            "",
            "Target-Paths:",
            "- .",
            "",
            "Acceptance:",
            "- The stand-in builder reports completion.",
            "",
            "Required-Checks:",
            "- none required by the stand-in runner",
            "",
            "References:",
            f"- {ws.rel(spec_path) if spec_path else 'millrace-agents/specs/active/' + spec_id + '.md'}",
            "",
            "Risk:",
            "- Stand-in task; no real work is performed.",
            "",
        ]
    )
    path = ws.agents / "tasks" / "queue" / f"{task_id}.md"
    _write_text(path, card)
    summary = ws.run_dir / "manager_summary.md"
    _write_text(summary, f"# Manager summary\n\nSource {family or 'spec'}: {spec_id}\nEmitted tasks:\n- {task_id}\n")
    return [str(path), str(summary)]


def _duty_arbiter(prompt: Prompt, ws: Workspace, marker: str) -> list[str]:
    outcome = marker.removeprefix("### ")
    root_spec_id = prompt.get("Closure Target Root Spec ID") or "unknown"
    verdict_path = ws.resolve(prompt.get("Preferred Verdict Path")) or (
        ws.agents / "arbiter" / "verdicts" / f"{root_spec_id}.json"
    )
    rubric_path = ws.resolve(prompt.get("Preferred Rubric Path")) or (
        ws.agents / "arbiter" / "rubrics" / f"{root_spec_id}.md"
    )
    report_path = ws.run_dir / "arbiter_report.md"
    preferred_report = ws.resolve(prompt.get("Preferred Report Path"))
    status, result_class, criterion_status = {
        "ARBITER_COMPLETE": ("pass", "success", "pass"),
        "REMEDIATION_NEEDED": ("remediation_needed", "followup_needed", "fail"),
    }.get(outcome, ("blocked", "blocked", "uncertain"))
    written: list[str] = []
    if not rubric_path.exists():
        _write_text(
            rubric_path,
            f"# Rubric {root_spec_id}\n\n- C1: the root spec's tasks completed (stand-in criterion)\n",
        )
        written.append(str(rubric_path))
    verdict = {
        "schema_version": "1.0",
        "kind": "arbiter_verdict",
        "root_spec_id": root_spec_id,
        "root_idea_id": prompt.get("Closure Target Root Idea ID"),
        "request_id": prompt.get("Request ID"),
        "run_id": prompt.get("Run ID"),
        "decided_at": _now_iso(),
        "status": status,
        "terminal_result": outcome,
        "result_class": result_class,
        "rubric_path": ws.rel(rubric_path),
        "report_path": ws.rel(report_path),
        "summary": f"stand-in arbiter verdict: {outcome}",
        "criteria": [
            {
                "criterion_id": "C1",
                "provenance": "fresh",
                "decision_relevant": True,
                "status": criterion_status,
                "title": "root spec tasks completed",
                "evidence_depth": "stand-in",
                "evidence": [],
            }
        ],
        "parity_gaps": [] if outcome == "ARBITER_COMPLETE" else ["stand-in gap"],
        "remediation_guidance": None
        if outcome != "REMEDIATION_NEEDED"
        else ["stand-in remediation: re-run the root spec tasks"],
    }
    _write_json(verdict_path, verdict)
    written.append(str(verdict_path))
    report = (
        f"# Arbiter report {root_spec_id}\n\n"
        f"Verdict: {outcome}\n\n"
        "| criterion | provenance | status |\n|---|---|---|\n"
        f"| C1 | fresh | {criterion_status} |\n"
    )
    _write_text(report_path, report)
    written.append(str(report_path))
    if preferred_report is not None and preferred_report != report_path:
        _write_text(preferred_report, report)
        written.append(str(preferred_report))
    return written


def _duty_recon(prompt: Prompt, ws: Workspace, marker: str) -> list[str]:
    outcome = marker.removeprefix("### ")
    decision = {
        "RECON_TO_EXECUTION": "to_execution",
        "RECON_TO_PLANNING": "to_planning",
        "RECON_NOOP": "noop",
        "RECON_BLOCKED": "blocked",
    }.get(outcome)
    if decision is None:  # generic ### BLOCKED: no packet
        return []
    handoff = {"to_execution": "execution", "to_planning": "planning"}.get(decision, decision)
    family, work_id = prompt.active_work_item()
    probe_id = work_id or "unknown-probe"
    probe_path = ws.resolve(prompt.get("Active Work Item Path"))
    title, probe = _read_doc_fields(probe_path)
    packets_dir = ws.agents / "recon" / "packets"
    packet_id = _unique(_safe_id(f"recon-{probe_id}"), lambda c: (packets_dir / f"{c}.md").exists())
    now = _now_iso()
    emitted_lines: list[str] = []
    written: list[str] = []
    references = [
        f"millrace-agents/probes/active/{probe_id}.md",
        f"millrace-agents/recon/packets/{packet_id}.md",
    ]
    if decision == "to_execution":
        task_id = _unique(_safe_id(f"{probe_id}-task"), ws.task_exists)
        emitted_lines.append(f"Emitted-Task-ID: {task_id}")
        task = {
            "schema_version": "1.0",
            "kind": "task",
            "task_id": task_id,
            "title": f"Execute {title or probe_id}",
            "summary": probe.get("Summary") or f"Execution handoff for probe {probe_id}.",
            "root_intake_kind": "probe",
            "root_intake_id": probe_id,
            "target_paths": ["."],
            "acceptance": ["The stand-in builder reports completion."],
            "required_checks": ["none required by the stand-in runner"],
            "references": references,
            "risk": ["Stand-in task; no real work is performed."],
            "status_hint": "queued",
            "created_at": now,
            "created_by": "recon",
        }
        path = ws.run_dir / "generated_task.json"
        _write_json(path, task)
        written.append(str(path))
    elif decision == "to_planning":
        spec_id = _unique(_safe_id(f"{probe_id}-spec"), ws.spec_exists)
        emitted_lines.append(f"Emitted-Spec-ID: {spec_id}")
        spec = {
            "schema_version": "1.0",
            "kind": "spec",
            "spec_id": spec_id,
            "title": f"Plan {title or probe_id}",
            "summary": probe.get("Summary") or f"Planning handoff for probe {probe_id}.",
            "source_type": "probe",
            "source_id": probe_id,
            "root_spec_id": spec_id,
            "root_intake_kind": "probe",
            "root_intake_id": probe_id,
            "goals": ["Deliver what the probe asked for."],
            "constraints": ["Stand-in spec; keep scope to the probe."],
            "acceptance": ["The stand-in builder reports completion."],
            "references": references,
            "created_at": now,
            "created_by": "recon",
        }
        path = ws.run_dir / "generated_spec.json"
        _write_json(path, spec)
        written.append(str(path))
    packet = "\n".join(
        [
            f"# Recon packet for {probe_id}",
            "",
            f"Recon-Packet-ID: {packet_id}",
            f"Probe-ID: {probe_id}",
            f"Decision: {decision}",
            "Confidence: high",
            "Risk-Level: low",
            f"Request-Summary: {probe.get('Request') or probe.get('Summary') or 'stand-in probe'}",
            "Interpreted-Goal: Stand-in interpretation of the probe request.",
            f"Handoff-Target: {handoff}",
            *emitted_lines,
            f"Created-At: {now}",
            "Created-By: recon",
            "",
            "Relevant-Paths:",
            "- . | workspace root (stand-in finding)",
            "",
            "Semantic-Invariants:",
            "- Existing behaviour is preserved (stand-in).",
            "",
            "Focused-Checks:",
            "- none required by the stand-in runner",
            "",
        ]
    )
    path = ws.run_dir / "recon_packet.md"
    _write_text(path, packet)
    written.insert(0, str(path))
    return written


_DUTIES = {
    "planner": _duty_planner,
    "manager": _duty_manager,
    "arbiter": _duty_arbiter,
    "recon": _duty_recon,
}


# --------------------------------------------------------------------------
# RPC loop
# --------------------------------------------------------------------------


class Session:
    def __init__(self) -> None:
        self.last_text = ""
        self.prompts = 0

    def handle_prompt(self, command: dict[str, Any]) -> None:
        request_id = command.get("id")
        message = command.get("message")
        if not isinstance(message, str):
            message = ""
        self.prompts += 1
        _write({"id": request_id, "type": "response", "command": "prompt", "success": True})
        _write({"type": "agent_start"})

        scenario = _load_scenario()
        log_path = scenario.get("log") if isinstance(scenario.get("log"), str) else None
        prompt = Prompt(message)
        stage = prompt.stage
        settings = _stage_settings(scenario, stage)

        default_marker = "blocked" if _recovery_follows(scenario, stage) else scenario.get("default_marker", "success")
        wanted: Any = settings.get("marker", default_marker)
        call_index = 0
        if isinstance(wanted, list):
            call_index = _previous_calls(log_path, stage)
            wanted = wanted[min(call_index, len(wanted) - 1)] if wanted else "success"
        if not prompt.legal_markers and str(wanted).strip().lower() == "success":
            marker = ""  # unexpected prompt: nothing legal to answer
        else:
            marker = _choose_marker(prompt, str(wanted))
        reply = settings.get("reply")
        text = reply if isinstance(reply, str) else marker

        delay = settings.get("delay_seconds", scenario.get("default_delay_seconds", 0.0))
        try:
            delay = max(0.0, float(delay))
        except (TypeError, ValueError):
            delay = 0.0

        record = {
            "event": "started",
            "stage": stage,
            "marker": marker,
            "text": text,
            "legal": marker in prompt.legal_markers,
            "pid": os.getpid(),
            "ppid": _ORIGINAL_PPID,
            "time": _now_iso(),
            "unix_time": round(time.time(), 3),
            "delay_seconds": delay,
            "run_id": prompt.get("Run ID"),
            "request_id": prompt.get("Request ID"),
            "work_item": " ".join(x for x in prompt.active_work_item() if x) or None,
            "call_index": call_index,
        }
        if not prompt.legal_markers:
            _debug(f"no legal markers found in prompt for stage {stage}; answering {text!r}")
        # log at the start of the call so a test can see a stage is running
        _append_log(log_path, record)

        hold = settings.get("hold_until")
        hold_path = Path(hold) if isinstance(hold, str) and hold else None

        def held() -> bool:
            return hold_path is not None and not hold_path.exists()

        deadline = time.monotonic() + delay
        while time.monotonic() < deadline or held():
            if _parent_gone():
                _debug(f"runtime (ppid {_ORIGINAL_PPID}) went away during {stage}; exiting")
                _append_log(log_path, {**record, "event": "abandoned", "time": _now_iso(), "unix_time": round(time.time(), 3)})
                _exit_quietly(0)
            time.sleep(0.05 if held() else min(0.05, max(0.0, deadline - time.monotonic())))
        if _parent_gone():
            _append_log(log_path, {**record, "event": "abandoned", "time": _now_iso(), "unix_time": round(time.time(), 3)})
            _exit_quietly(0)

        if settings.get("crash"):
            _debug(f"scripted crash in stage {stage}")
            _append_log(log_path, {**record, "event": "crashed", "time": _now_iso(), "unix_time": round(time.time(), 3)})
            _exit_quietly(1)

        duty = _DUTIES.get(stage)
        if duty is not None and reply is None:
            try:
                duty(prompt, Workspace(prompt), marker)
            except Exception as exc:  # never crash; the runtime will judge
                _debug(f"duty for {stage} failed: {exc!r}")

        self.last_text = text
        assistant = {
            "role": "assistant",
            "content": [{"type": "text", "text": text}],
            "stopReason": "stop",
            "usage": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0, "totalTokens": 0},
        }
        _write({"type": "message_end", "message": assistant})
        _write({"type": "agent_end", "messages": [assistant]})

    def respond(self, command: dict[str, Any]) -> None:
        kind = command.get("type")
        request_id = command.get("id")
        if kind == "prompt":
            self.handle_prompt(command)
        elif kind == "get_last_assistant_text":
            _write(
                {
                    "id": request_id,
                    "type": "response",
                    "command": kind,
                    "success": True,
                    "data": {"text": self.last_text},
                }
            )
        elif kind == "get_session_stats":
            _write(
                {
                    "id": request_id,
                    "type": "response",
                    "command": kind,
                    "success": True,
                    "data": {
                        "sessionFile": None,
                        "sessionId": f"stand-in-{os.getpid()}",
                        "userMessages": self.prompts,
                        "assistantMessages": self.prompts,
                        "toolCalls": 0,
                        "toolResults": 0,
                        "totalMessages": self.prompts * 2,
                        "tokens": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0, "total": 0},
                        "cost": 0,
                    },
                }
            )
        else:
            payload: dict[str, Any] = {"type": "response", "command": kind, "success": True}
            if request_id is not None:
                payload["id"] = request_id
            _write(payload)


def main(argv: list[str]) -> int:
    if "--version" in argv or "-v" in argv:
        print("stand-in-pi 0.1.0")
        return 0
    session = Session()
    stdin = sys.stdin.buffer
    while True:
        try:
            raw = stdin.readline()
        except (OSError, ValueError):
            break
        if not raw:
            break
        line = raw.decode("utf-8", errors="replace").strip()
        if not line:
            continue
        try:
            command = json.loads(line)
        except json.JSONDecodeError as exc:
            _debug(f"ignoring non-JSON line: {exc}")
            continue
        if not isinstance(command, dict):
            continue
        try:
            session.respond(command)
        except Exception as exc:
            _debug(f"error handling {command.get('type')!r}: {exc!r}")
            payload = {"type": "response", "command": command.get("type"), "success": False, "error": str(exc)}
            if command.get("id") is not None:
                payload["id"] = command.get("id")
            _write(payload)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
