#!/usr/bin/env python3
"""A scripted, OpenAI-compatible chat-completions server for driving the real `pi` offline.

Replaces only the language model. `pi` (configured through `models.json` with
`"api": "openai-completions"` and `baseUrl http://127.0.0.1:PORT/v1`) sends
`POST /v1/chat/completions` with `"stream": true`; this server answers with the next scripted
reply as server-sent events, exactly as an OpenAI-compatible endpoint would.

Usage:
    model_server.py --script SCRIPT.json --log REQUESTS.jsonl [--port 0]

It binds 127.0.0.1 (port 0 = ephemeral) and prints one line `PORT <n>` on stdout once it
accepts connections. It runs until killed or until its stdin closes (so a test that dies
takes its server with it).

Script (JSON file, re-read whenever it changes on disk; counters reset then):

    {"replies": [
        {"when": "Decide whether", "text": "```json\\n{\\"decision\\": \\"direct\\"}\\n```"},
        {"tool_calls": [{"name": "write", "arguments": {"path": "a.txt", "content": "x"}}]},
        {"status": 500, "error": "upstream exploded"},
        {"text": "slow answer", "delay_seconds": 5},
        {"when": "progress event", "text": "Noted.", "repeat": true}
     ],
     "default": {"text": "ok"}}

For each request the first reply is used whose `when` (a string, or a list of strings that
must all occur) occurs in the text of the request's last message and that has uses left: a reply is used once unless `"repeat": true`
(or `"times": n`). Reply fields:
- `text`: assistant text, streamed in chunks of `chunk` characters (default: one chunk);
- `tool_calls`: a list of `{"name", "arguments" (object or JSON text), "id"?}`, finish
  reason `tool_calls` (pi runs the tools and asks again with the results);
- `status` (+ `error`): an HTTP error with an OpenAI-style error body instead of a stream;
- `finish_reason`: override (`stop`, `length`, `content_filter` …);
- `delay_seconds`: sleep before answering (a client that gives up just closes the socket).
No matching reply and no `default`: the text `[model_server] no scripted reply`.

Every request is appended to the log as one JSON line, before the reply is sent:
`{"n": 1, "time": …, "path": "/v1/chat/completions", "reply": <index or null>,
"last_text": "…", "message_count": 3, "body": {…the request body…}}`.

Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NO_REPLY = {"text": "[model_server] no scripted reply"}


class Script:
    """The replies and how often each was used; reloaded when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.mtime: float | None = None
        self.replies: list[dict[str, Any]] = []
        self.default: dict[str, Any] | None = None
        self.used: list[int] = []

    def _reload_if_changed(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            return
        if mtime == self.mtime:
            return
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError) as exc:
            print(f"model_server: cannot read script {self.path}: {exc}", file=sys.stderr)
            return
        self.mtime = mtime
        self.replies = [r for r in data.get("replies", []) if isinstance(r, dict)]
        default = data.get("default")
        self.default = default if isinstance(default, dict) else None
        self.used = [0] * len(self.replies)

    def pick(self, last_text: str) -> tuple[int | None, dict[str, Any]]:
        with self.lock:
            self._reload_if_changed()
            for index, reply in enumerate(self.replies):
                when = reply.get("when")
                if isinstance(when, str):
                    when = [when]
                if isinstance(when, list) and not all(
                    isinstance(w, str) and w in last_text for w in when
                ):
                    continue
                if reply.get("repeat") is True:
                    limit = None
                else:
                    limit = reply.get("times", 1)
                if limit is not None and self.used[index] >= limit:
                    continue
                self.used[index] += 1
                return index, reply
            return None, self.default or NO_REPLY


def message_text(message: Any) -> str:
    """The text of one chat message (string content or a list of text parts)."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "\n".join(parts)
    return ""


class Handler(BaseHTTPRequestHandler):
    server_version = "model_server/1"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        return

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": "fake-chat", "object": "model"}]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {"unparsed": raw.decode("utf-8", "replace")}
        messages = body.get("messages") if isinstance(body, dict) else None
        messages = messages if isinstance(messages, list) else []
        last_text = message_text(messages[-1]) if messages else ""
        index, reply = self.server.script.pick(last_text)  # type: ignore[attr-defined]
        self.server.record(  # type: ignore[attr-defined]
            {
                "path": self.path,
                "reply": index,
                "last_text": last_text,
                "message_count": len(messages),
                "body": body,
            }
        )
        delay = reply.get("delay_seconds")
        if isinstance(delay, (int, float)) and delay > 0:
            time.sleep(delay)
        try:
            self._answer(reply, body if isinstance(body, dict) else {})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test): nothing to tell anyone

    def _json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer(self, reply: dict[str, Any], body: dict[str, Any]) -> None:
        status = reply.get("status")
        if isinstance(status, int) and status >= 400:
            message = str(reply.get("error") or f"scripted HTTP {status}")
            self._json(status, {"error": {"message": message, "type": "server_error", "code": None}})
            return
        model = str(body.get("model") or "fake-chat")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        created = int(time.time())
        ident = f"chatcmpl-{self.server.count}"  # type: ignore[attr-defined]

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: bool = False) -> None:
            event: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if usage:
                event["usage"] = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
            self.wfile.write(b"data: " + json.dumps(event).encode("utf-8") + b"\n\n")
            self.wfile.flush()

        chunk({"role": "assistant", "content": ""})
        text = reply.get("text")
        if isinstance(text, str) and text:
            size = reply.get("chunk")
            size = size if isinstance(size, int) and size > 0 else len(text)
            for start in range(0, len(text), size):
                chunk({"content": text[start : start + size]})
        finish = "stop"
        calls = reply.get("tool_calls")
        if isinstance(calls, list) and calls:
            for position, call in enumerate(calls):
                arguments = call.get("arguments", {})
                if not isinstance(arguments, str):
                    arguments = json.dumps(arguments)
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": position,
                                "id": call.get("id") or f"call_{self.server.count}_{position}",  # type: ignore[attr-defined]
                                "type": "function",
                                "function": {"name": call.get("name"), "arguments": arguments},
                            }
                        ]
                    }
                )
            finish = "tool_calls"
        finish = str(reply.get("finish_reason") or finish)
        chunk({}, finish=finish, usage=True)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, script: Script, log_path: str) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.script = script
        self.log_path = log_path
        self.count = 0
        self.log_lock = threading.Lock()

    def record(self, entry: dict[str, Any]) -> None:
        with self.log_lock:
            self.count += 1
            line = {"n": self.count, "time": time.time(), **entry}
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = Server(args.port, Script(args.script), args.log)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"PORT {server.server_address[1]}", flush=True)
    # Ends when the parent closes our stdin (or dies), or on a signal.
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except KeyboardInterrupt:
        pass
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
