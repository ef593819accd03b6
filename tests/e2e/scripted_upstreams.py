"""Scripted upstreams for the e2e suite: one real HTTP server per upstream kind
(Anthropic Messages, OpenAI Chat Completions, Gemini, Amazon Bedrock, OpenAI Responses),
standard library only, on 127.0.0.1 port 0.

Each server reads a request into a `View` (which tools are offered, how many tool results
the conversation carries, whether a JSON answer is asked for), lets the cell's `Scenario`
decide the `Turn`, and writes that turn in its own wire format, streamed or not:

* no tool result yet, and the client's shell tool is offered: call it (or two calls at
  once, or Codex's apply_patch) to write a file in the client's working directory;
* the tool results are back: a final text carrying the scenario's unique marker;
* a request that asks for JSON (title generation, routing classifiers): JSON matching
  the schema it sent; any other side call: a short text.

Faults: `cut` sends the first final answer halfway and drops the connection; `429` answers
the first main turn with a rate-limit error without Retry-After; `window` (OpenAI Chat only)
refuses the first main turn the way vLLM refuses an output cap its context window cannot
hold beside the prompt. Every request is recorded
(method, path, headers, body, the turn given) for the tests' assertions and the captures.
"""
from __future__ import annotations

import base64
import gzip
import itertools
import json
import re
import socket
import struct
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SHELL_TOOLS = ("Bash", "run_shell_command", "exec_command", "shell_command", "shell",
               "local_shell")
PATCH_TOOL = "apply_patch"
WEATHER_TOOL = "get_weather"          # the SDK tests' tool
FINAL_PIECES = ("Finished", ": the proof", " file is written", ". Marker: ")


# -- what the script decides ----------------------------------------------------------

@dataclass
class Call:
    name: str
    args: dict                       # JSON arguments of a function tool
    text: str = ""                   # raw input of a freeform (custom) tool
    custom: bool = False


@dataclass
class Turn:
    label: str                       # main-turn, tool-result-turn, side-json, side-text
    calls: list = field(default_factory=list)
    text: str = ""
    pieces: tuple = ()               # how the text is streamed


@dataclass
class Tool:
    name: str
    schema: dict
    custom: bool = False


@dataclass
class View:
    """What a scripted upstream needs to know about one request, whatever its format."""
    tools: dict                      # name -> Tool
    results: list                    # tool results in the conversation (their text)
    schema: Any = None               # JSON schema the answer must follow, if asked
    stream: bool = False
    model: str = ""
    include_usage: bool = False      # OpenAI stream_options.include_usage
    thinking: bool = False           # Anthropic: extended thinking asked for
    refusal: str = ""                # why the API would refuse the request (400), if it would


@dataclass
class Scenario:
    """One cell's script: what the agent is told to do and which fault to inject."""
    tag: str                         # unique per cell; in file contents and the marker
    mode: str = "shell"              # shell | parallel | patch | weather
    fault: str = ""                  # "" | cut | 429 | window

    @property
    def marker(self) -> str:
        return f"E2E-MARKER-{self.tag}"

    def files(self) -> dict:
        """File name -> the content the agent must leave in the working directory."""
        if self.mode == "parallel":
            return {"proof-1.txt": f"one-{self.tag}\n", "proof-2.txt": f"two-{self.tag}\n"}
        if self.mode == "patch":
            return {"notes.txt": f"title: e2e\nstatus: done-{self.tag}\n"}
        if self.mode == "weather":
            return {}
        return {"proof.txt": f"e2e-ok-{self.tag}\n"}

    def seed_files(self) -> dict:
        """Files the working directory starts with (the patch mode edits one)."""
        return {"notes.txt": "title: e2e\nstatus: todo\n"} if self.mode == "patch" else {}

    def prompt(self) -> str:
        if self.mode == "parallel":
            return ("Create the files proof-1.txt and proof-2.txt in the current directory "
                    "with your shell tool, both at once, then say done.")
        if self.mode == "patch":
            return "In notes.txt change the status line to done using apply_patch, then say done."
        return "Create the file proof.txt in the current directory with your shell tool, then say done."

    def commands(self) -> list:
        return [f"echo {content.strip()} > {name}" for name, content in self.files().items()]

    def patch(self) -> str:
        return ("*** Begin Patch\n*** Update File: notes.txt\n@@\n title: e2e\n"
                f"-status: todo\n+status: done-{self.tag}\n*** End Patch\n")

    def calls_expected(self) -> int:
        return 2 if self.mode == "parallel" else 1

    def decide(self, view: View) -> Turn:
        if view.schema is not None:
            return Turn("side-json", text=json.dumps(example_for(view.schema)))
        tool = self.pick_tool(view.tools)
        if tool is None:
            return Turn("side-text", text="OK")
        if len(view.results) >= self.calls_expected():
            return Turn("tool-result-turn", text="".join(FINAL_PIECES) + self.marker,
                        pieces=FINAL_PIECES + (self.marker,))
        return Turn("main-turn", calls=self.calls_for(tool))

    def pick_tool(self, tools: dict):
        wanted = {"patch": (PATCH_TOOL,), "weather": (WEATHER_TOOL,)}.get(self.mode, SHELL_TOOLS)
        return next((tools[name] for name in wanted if name in tools), None)

    def calls_for(self, tool: Tool) -> list:
        if self.mode == "weather":
            return [Call(tool.name, {"city": "Paris"})]
        if tool.name == PATCH_TOOL:
            if tool.custom:
                return [Call(tool.name, {}, text=self.patch(), custom=True)]
            return [Call(tool.name, {string_property(tool.schema) or "input": self.patch()})]
        return [Call(tool.name, shell_args(tool.schema, cmd)) for cmd in self.commands()]


def string_property(schema: dict) -> str:
    """The name of the only (or first required) string property of an object schema."""
    props = (schema or {}).get("properties") or {}
    required = [n for n in (schema or {}).get("required") or [] if n in props]
    for name in required + list(props):
        if str(props[name].get("type", "")).lower() == "string":
            return name
    return ""


def shell_args(schema: dict, command: str) -> dict:
    """Arguments for a shell tool: the command in whatever property holds it."""
    props = (schema or {}).get("properties") or {}
    args: dict = {}
    for name in ("command", "cmd"):
        if name in props:
            kind = str(props[name].get("type", "string")).lower()
            args[name] = ["bash", "-lc", command] if kind == "array" else command
            break
    else:
        args["command"] = command
    for name in (schema or {}).get("required") or []:
        if name not in args and name in props:
            args[name] = "write the e2e proof file" if name == "description" \
                else example_for(props[name])
    return args


def example_for(schema: Any) -> Any:
    """A value that validates against a JSON schema (or Gemini's OBJECT/STRING variant)."""
    if not isinstance(schema, dict):
        return "e2e"
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return example_for(schema[key][0])
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    kind = str(kind).lower()
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: example_for(sub) for name, sub in props.items()}
    if kind == "array":
        return [example_for(schema.get("items"))] * max(1, schema.get("minItems") or 1)
    if kind in ("integer", "number"):
        low = schema.get("minimum", 1)
        return int(low) if kind == "integer" else float(low)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "e2e title" if not schema.get("minLength") else "e2e" * schema["minLength"]


# -- recording --------------------------------------------------------------------

@dataclass
class Recorded:
    method: str
    path: str
    headers: dict
    body: Any                        # parsed JSON, or text when not JSON
    label: str = ""                  # the turn given, or the endpoint's name
    model: str = ""                  # the model the request asked for (body or path)
    tools: tuple = ()                # the tool names offered
    results: tuple = ()              # the tool results carried
    status: int = 0
    fault: str = ""
    at: float = 0.0

    def as_capture(self) -> dict:
        secret = ("authorization", "x-api-key", "x-goog-api-key", "api-key", "x-amz-security-token")
        headers = {k: ("REDACTED" if k.lower() in secret else v) for k, v in self.headers.items()}
        path = re.sub(r"([?&]key=)[^&]+", r"\1REDACTED", self.path)
        return {"method": self.method, "path": path, "headers": headers, "body": self.body}


# -- the server -------------------------------------------------------------------

class ScriptedUpstream:
    """Base class: a threaded HTTP/1.1 server whose subclasses speak one API format."""
    kind = ""

    def __init__(self, scenario: Scenario):
        self.scenario = scenario
        self.requests: list = []
        self.faults_fired: list = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # what the tests look at
    def labels(self) -> list:
        return [r.label for r in self.requests]

    def saw_tool_result(self) -> bool:
        return any(r.label == "tool-result-turn" for r in self.requests)

    def next_id(self) -> int:
        return next(self._ids)

    # per-kind hooks
    def route(self, method: str, path: str) -> str:
        """Name the endpoint: 'turn' for a model call, or count/models/head/unknown."""
        raise NotImplementedError

    def view(self, path: str, body: dict) -> View:
        raise NotImplementedError

    def answer(self, turn: Turn, view: View) -> tuple:
        """(status, headers, list of body chunks, streamed?) for a turn."""
        raise NotImplementedError

    def side_answer(self, endpoint: str, body: Any) -> tuple:
        """(status, headers, body bytes) for count/models/head/unknown endpoints."""
        if endpoint == "head":
            return 200, {"Content-Type": "application/json"}, b'{"status":"ok"}'
        return 404, {"Content-Type": "application/json"}, \
            b'{"error":{"message":"the e2e upstream does not serve this path"}}'

    def rate_limited(self) -> tuple:
        """(status, headers, body) of a 429 without Retry-After."""
        raise NotImplementedError

    def window_exceeded(self, body: dict) -> tuple:
        """(status, headers, body) of an output cap the context window cannot hold."""
        raise NotImplementedError

    # the request cycle
    def _decide(self, rec: Recorded, endpoint: str) -> tuple:
        if endpoint != "turn" or not isinstance(rec.body, dict):
            rec.label = endpoint
            status, headers, body = self.side_answer(endpoint, rec.body)
            return status, headers, [body], False, ""
        view = self.view(rec.path, rec.body)
        turn = self.scenario.decide(view)
        rec.label, rec.model = turn.label, view.model
        rec.tools, rec.results = tuple(view.tools), tuple(view.results)
        fault = self._fault_for(turn, view)
        if fault in ("429", "window"):
            status, headers, body = self.rate_limited() if fault == "429" else self.window_exceeded(rec.body)
            return status, headers, [body], False, fault
        status, headers, chunks, streamed = self.answer(turn, view)
        return status, headers, chunks, streamed, fault

    def _fault_for(self, turn: Turn, view: View) -> str:
        """Each fault fires once per cell: 429 on the first main turn, the cut on the
        first streamed final answer."""
        fault = self.scenario.fault
        with self._lock:
            if not fault or fault in self.faults_fired:
                return ""
            if (fault in ("429", "window") and turn.label == "main-turn") or \
               (fault == "cut" and turn.label == "tool-result-turn" and view.stream):
                self.faults_fired.append(fault)
                return fault
        return ""

    def _handler_class(self):
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if self.headers.get("Content-Encoding", "").lower() == "gzip":
                    raw = gzip.decompress(raw)
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                rec = Recorded(self.command, self.path, dict(self.headers.items()), body,
                               at=time.monotonic())
                with upstream._lock:
                    upstream.requests.append(rec)
                endpoint = upstream.route(self.command, self.path)
                status, headers, chunks, streamed, fault = upstream._decide(rec, endpoint)
                rec.status, rec.fault = status, fault
                self._send(status, headers, chunks, streamed, cut=fault == "cut")

            def _send(self, status, headers, chunks, streamed, cut) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if streamed:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(sum(len(c) for c in chunks)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if not streamed:
                    self.wfile.write(b"".join(chunks))
                    return
                sent = chunks[:max(1, len(chunks) // 2)] if cut else chunks
                for chunk in sent:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                if cut:                      # drop the connection mid-answer
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(b"0\r\n\r\n")

            do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _handle

        return Handler


def sse(event: str, data: Any) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + b"data: " + payload.encode() + b"\n\n"


SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
JSON_HEADERS = {"Content-Type": "application/json"}


def split_in_two(text: str) -> list:
    middle = max(1, len(text) // 2)
    return [text[:middle], text[middle:]]


# -- Anthropic Messages -------------------------------------------------------------

def anthropic_tools(body: dict) -> dict:
    tools = {}
    for tool in body.get("tools") or []:
        if tool.get("name"):
            tools[tool["name"]] = Tool(tool["name"], tool.get("input_schema") or {})
    return tools


def anthropic_results(body: dict) -> list:
    found = []
    for message in body.get("messages") or []:
        content = message.get("content")
        for block in content if isinstance(content, list) else []:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                found.append(json.dumps(block.get("content")))
    return found


def anthropic_schema(body: dict):
    fmt = (body.get("output_config") or {}).get("format") or body.get("output_format") or {}
    return fmt.get("schema") if fmt.get("type") == "json_schema" else None


THINKING_SIGNATURE = "RTJFIHRoaW5raW5nIHNpZ25hdHVyZQ=="    # what this upstream signs its thinking with


def anthropic_view(body: dict, tools_path_stream: tuple) -> View:
    """What Anthropic would check of extended thinking: every thinking block carries a
    signature it made, and with thinking on, an assistant turn that called tools (the
    one the tool results answer) starts with its thinking block."""
    stream, model = tools_path_stream
    thinking = (body.get("thinking") or {}).get("type") in ("enabled", "adaptive")
    refusal = ""
    messages = body.get("messages") or []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message.get("content"), list) else []
        for j, block in enumerate(content):
            if block.get("type") == "thinking" and block.get("signature") != THINKING_SIGNATURE:
                refusal = f"messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
            media = (block.get("source") or {}).get("media_type") if block.get("type") == "image" else None
            if media is not None and media not in ("image/jpeg", "image/png", "image/gif", "image/webp"):
                refusal = (f"messages.{i}.content.{j}.image.source.base64.media_type: Input should be "
                           "'image/jpeg', 'image/png', 'image/gif' or 'image/webp'")
        last_call = message.get("role") == "assistant" and any(b.get("type") == "tool_use" for b in content)
        if thinking and last_call and i == len(messages) - 2 and \
                content[0].get("type") not in ("thinking", "redacted_thinking"):
            refusal = (f"messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
                       f"`{content[0].get('type')}`. When `thinking` is enabled, a final `assistant` message "
                       "must start with a thinking block")
    return View(anthropic_tools(body), anthropic_results(body), anthropic_schema(body), stream, model,
                thinking=thinking, refusal=refusal)


class AnthropicUpstream(ScriptedUpstream):
    kind = "anthropic"
    model_name = "claude-e2e-upstream"

    def route(self, method: str, path: str) -> str:
        path = urllib.parse.urlsplit(path).path
        if method == "HEAD":
            return "head"
        if path.endswith("/v1/messages/count_tokens"):
            return "count_tokens"
        if path.endswith("/v1/messages"):
            return "turn"
        if path.rstrip("/").endswith("/v1/models") or "/v1/models/" in path:
            return "models"
        return "unknown"

    def view(self, path: str, body: dict) -> View:
        return anthropic_view(body, (bool(body.get("stream")), body.get("model", "")))

    def side_answer(self, endpoint: str, body: Any) -> tuple:
        if endpoint == "count_tokens":
            return 200, JSON_HEADERS, json.dumps({"input_tokens": 42}).encode()
        if endpoint == "models":
            return 200, JSON_HEADERS, json.dumps({
                "data": [{"type": "model", "id": self.model_name, "display_name": "e2e",
                          "created_at": "2026-01-01T00:00:00Z"}],
                "has_more": False, "first_id": self.model_name, "last_id": self.model_name}).encode()
        return super().side_answer(endpoint, body)

    def rate_limited(self) -> tuple:
        return 429, JSON_HEADERS, json.dumps({"type": "error", "error": {
            "type": "rate_limit_error", "message": "e2e upstream: rate limited"}}).encode()

    def message(self, turn: Turn, model: str, thinking: bool = False) -> dict:
        content = [{"type": "thinking", "thinking": "Planning the answer.",
                    "signature": THINKING_SIGNATURE}] if thinking else []
        content += [{"type": "text", "text": turn.text}] if turn.text else []
        for call in turn.calls:
            content.append({"type": "tool_use", "id": f"toolu_e2e{self.next_id()}",
                            "name": call.name, "input": call.args})
        return {"id": f"msg_e2e{self.next_id()}", "type": "message", "role": "assistant",
                "model": model or self.model_name, "content": content,
                "stop_reason": "tool_use" if turn.calls else "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 40, "output_tokens": 12}}

    def events(self, turn: Turn, model: str, thinking: bool = False) -> list:
        """The Anthropic stream of a turn as (event type, data) pairs."""
        msg = self.message(turn, model, thinking)
        start = dict(msg, content=[], stop_reason=None, usage={"input_tokens": 40, "output_tokens": 1})
        out = [("message_start", {"type": "message_start", "message": start})]
        for index, block in enumerate(msg["content"]):
            if block["type"] == "thinking":
                out.append(("content_block_start", {"type": "content_block_start", "index": index,
                                                    "content_block": {"type": "thinking", "thinking": "",
                                                                      "signature": ""}}))
                out.append(("content_block_delta", {"type": "content_block_delta", "index": index,
                                                    "delta": {"type": "thinking_delta",
                                                              "thinking": block["thinking"]}}))
                out.append(("content_block_delta", {"type": "content_block_delta", "index": index,
                                                    "delta": {"type": "signature_delta",
                                                              "signature": block["signature"]}}))
            elif block["type"] == "text":
                out.append(("content_block_start", {"type": "content_block_start", "index": index,
                                                    "content_block": {"type": "text", "text": ""}}))
                for piece in turn.pieces or (turn.text,):
                    out.append(("content_block_delta", {"type": "content_block_delta", "index": index,
                                                        "delta": {"type": "text_delta", "text": piece}}))
            else:
                out.append(("content_block_start", {"type": "content_block_start", "index": index,
                                                    "content_block": dict(block, input={})}))
                for piece in split_in_two(json.dumps(block["input"])):
                    out.append(("content_block_delta", {"type": "content_block_delta", "index": index,
                                                        "delta": {"type": "input_json_delta",
                                                                  "partial_json": piece}}))
            out.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        out.append(("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None},
                                      "usage": {"output_tokens": 12}}))
        out.append(("message_stop", {"type": "message_stop"}))
        return out

    def refused(self, view: View) -> tuple:
        return 400, JSON_HEADERS, [json.dumps({"type": "error", "error": {
            "type": "invalid_request_error", "message": view.refusal}}).encode()], False

    def answer(self, turn: Turn, view: View) -> tuple:
        if view.refusal:
            return self.refused(view)
        if not view.stream:
            return 200, JSON_HEADERS, [json.dumps(self.message(turn, view.model, view.thinking)).encode()], False
        return 200, SSE_HEADERS, [sse(name, data) for name, data in
                                  self.events(turn, view.model, view.thinking)], True


# -- Amazon Bedrock (Anthropic bodies, event-stream framing) -------------------------

def eventstream_frame(headers: dict, payload: bytes) -> bytes:
    """One application/vnd.amazon.eventstream message (PROTOCOLS.md F.5), string headers."""
    head = b""
    for name, value in headers.items():
        raw = value.encode()
        head += bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(raw)) + raw
    total = 12 + len(head) + len(payload) + 4
    prelude = struct.pack(">II", total, len(head))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + head + payload
    return message + struct.pack(">I", zlib.crc32(message))


class BedrockUpstream(AnthropicUpstream):
    """Reached as the outbound HTTP proxy of a bedrock-runtime.<region>.amazonaws.com
    base URL, so request paths arrive in absolute form."""
    kind = "bedrock"
    model_name = "us.anthropic.claude-e2e-v1:0"

    def route(self, method: str, path: str) -> str:
        path = urllib.parse.urlsplit(path).path
        if re.search(r"/model/[^/]+/(invoke|invoke-with-response-stream)$", path):
            return "turn"
        if re.search(r"/model/[^/]+/count-tokens$", path):
            return "count_tokens"
        return "head" if method == "HEAD" else "unknown"

    def view(self, path: str, body: dict) -> View:
        model = urllib.parse.unquote(urllib.parse.urlsplit(path).path.split("/model/", 1)[-1].rsplit("/", 1)[0])
        return anthropic_view(body, (path.endswith("/invoke-with-response-stream"), model))

    def side_answer(self, endpoint: str, body: Any) -> tuple:
        if endpoint == "count_tokens":
            return 200, JSON_HEADERS, b'{"inputTokens": 42}'
        return super().side_answer(endpoint, body)

    def rate_limited(self) -> tuple:
        return 429, dict(JSON_HEADERS, **{
            "x-amzn-ErrorType": "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/"}), \
            b'{"message":"Too many requests, please wait before trying again."}'

    def answer(self, turn: Turn, view: View) -> tuple:
        if view.refusal:
            return 400, dict(JSON_HEADERS, **{"x-amzn-ErrorType": "ValidationException"}), \
                [json.dumps({"message": view.refusal}).encode()], False
        if not view.stream:
            msg = self.message(turn, view.model, view.thinking)
            msg["id"] = msg["id"].replace("msg_", "msg_bdrk_")
            return 200, JSON_HEADERS, [json.dumps(msg).encode()], False
        frames = []
        for name, data in self.events(turn, view.model, view.thinking):
            if name == "message_stop":
                data = dict(data, **{"amazon-bedrock-invocationMetrics": {
                    "inputTokenCount": 40, "outputTokenCount": 12,
                    "invocationLatency": 5, "firstByteLatency": 1}})
            payload = json.dumps({"bytes": base64.b64encode(json.dumps(data).encode()).decode()})
            frames.append(eventstream_frame({":event-type": "chunk", ":content-type": "application/json",
                                             ":message-type": "event"}, payload.encode()))
        return 200, {"Content-Type": "application/vnd.amazon.eventstream"}, frames, True


# -- OpenAI Chat Completions -----------------------------------------------------------

class OpenAIChatUpstream(ScriptedUpstream):
    kind = "openai"
    model_name = "gpt-e2e-upstream"

    def route(self, method: str, path: str) -> str:
        path = urllib.parse.urlsplit(path).path
        if path.endswith("/chat/completions"):
            return "turn"
        if path.rstrip("/").endswith("/models"):
            return "models"
        return "head" if method == "HEAD" else "unknown"

    def view(self, path: str, body: dict) -> View:
        tools = {}
        for tool in body.get("tools") or []:
            fn = tool.get("function") or {}
            if fn.get("name"):
                tools[fn["name"]] = Tool(fn["name"], fn.get("parameters") or {})
        results = [json.dumps(m.get("content")) for m in body.get("messages") or [] if m.get("role") == "tool"]
        fmt = body.get("response_format") or {}
        schema = (fmt.get("json_schema") or {}).get("schema", {}) if fmt.get("type") == "json_schema" \
            else ({} if fmt.get("type") == "json_object" else None)
        return View(tools, results, schema, bool(body.get("stream")), body.get("model", ""),
                    bool((body.get("stream_options") or {}).get("include_usage")))

    def side_answer(self, endpoint: str, body: Any) -> tuple:
        if endpoint == "models":
            return 200, JSON_HEADERS, json.dumps({"object": "list", "data": [
                {"id": self.model_name, "object": "model", "created": 1, "owned_by": "e2e"}]}).encode()
        return super().side_answer(endpoint, body)

    def rate_limited(self) -> tuple:
        return 429, JSON_HEADERS, json.dumps({"error": {
            "message": "e2e upstream: rate limited", "type": "requests",
            "param": None, "code": "rate_limit_exceeded"}}).encode()

    WINDOW_PROMPT = 1200             # the prompt tokens the window fault says it counted

    def window(self, body: dict) -> int:
        """A window one token too small for the prompt and the cap the request asks."""
        return self.asked(body) + self.WINDOW_PROMPT - 1

    @staticmethod
    def asked(body: dict) -> int:
        return body.get("max_completion_tokens") or body.get("max_tokens") or 32000

    def window_exceeded(self, body: dict) -> tuple:
        """vLLM's words (serving_engine.py) for max_tokens over what the window leaves."""
        asked, window = self.asked(body), self.window(body)
        message = (f"'max_tokens' or 'max_completion_tokens' is too large: {asked}. This model's maximum "
                   f"context length is {window} tokens and your request has {self.WINDOW_PROMPT} input "
                   f"tokens ({asked} > {window} - {self.WINDOW_PROMPT}). (parameter=max_tokens, value={asked})")
        return 400, JSON_HEADERS, json.dumps({"error": {"message": message, "type": "BadRequestError",
                                                        "param": None, "code": 400}}).encode()

    def tool_calls(self, turn: Turn) -> list:
        return [{"id": f"call_e2e{self.next_id()}", "type": "function",
                 "function": {"name": c.name, "arguments": json.dumps(c.args)}} for c in turn.calls]

    def answer(self, turn: Turn, view: View) -> tuple:
        model = view.model or self.model_name
        calls = self.tool_calls(turn)
        finish = "tool_calls" if calls else "stop"
        usage = {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52}
        if not view.stream:
            message = {"role": "assistant", "content": turn.text or None}
            if calls:
                message["tool_calls"] = calls
            return 200, JSON_HEADERS, [json.dumps({
                "id": "chatcmpl-e2e", "object": "chat.completion", "created": int(time.time()),
                "model": model, "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": usage}).encode()], False

        def chunk(delta: dict, finish_reason=None, **extra) -> bytes:
            return sse("", dict({"id": "chatcmpl-e2e", "object": "chat.completion.chunk",
                                 "created": int(time.time()), "model": model,
                                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]},
                                **extra))
        out = [chunk({"role": "assistant", "content": ""})]
        for piece in turn.pieces or ((turn.text,) if turn.text else ()):
            out.append(chunk({"content": piece}))
        for index, call in enumerate(calls):
            first, second = split_in_two(call["function"]["arguments"])
            out.append(chunk({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                              "function": {"name": call["function"]["name"],
                                                           "arguments": first}}]}))
            out.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": second}}]}))
        out.append(chunk({}, finish))
        if view.include_usage:
            out.append(sse("", {"id": "chatcmpl-e2e", "object": "chat.completion.chunk",
                                "created": int(time.time()), "model": model, "choices": [],
                                "usage": usage}))
        out.append(b"data: [DONE]\n\n")
        return 200, SSE_HEADERS, out, True


# -- Gemini ---------------------------------------------------------------------------

class GeminiUpstream(ScriptedUpstream):
    kind = "gemini"
    model_name = "gemini-e2e-upstream"
    signature = "ZTJlLXRob3VnaHQtc2lnbmF0dXJl"   # a Gemini 3 thoughtSignature stand-in

    def route(self, method: str, path: str) -> str:
        path = urllib.parse.urlsplit(path).path
        if re.search(r"/models/[^/]+:(generateContent|streamGenerateContent)$", path):
            return "turn"
        if re.search(r"/models/[^/]+:countTokens$", path):
            return "count_tokens"
        if re.search(r"/models/?$", path) or re.search(r"/models/[^/:]+$", path):
            return "models"
        return "head" if method == "HEAD" else "unknown"

    def view(self, path: str, body: dict) -> View:
        tools = {}
        for group in body.get("tools") or []:
            for fn in group.get("functionDeclarations") or group.get("function_declarations") or []:
                schema = fn.get("parametersJsonSchema") or fn.get("parameters") or {}
                tools[fn["name"]] = Tool(fn["name"], schema)
        results = [json.dumps(part["functionResponse"]) for content in body.get("contents") or []
                   for part in content.get("parts") or [] if "functionResponse" in part]
        config = body.get("generationConfig") or {}
        schema = config.get("responseJsonSchema") or config.get("responseSchema")
        if schema is None and config.get("responseMimeType") == "application/json":
            schema = {}
        model = urllib.parse.unquote(urllib.parse.urlsplit(path).path.rsplit("/", 1)[-1].split(":")[0])
        return View(tools, results, schema, ":streamGenerateContent" in path, model)

    def side_answer(self, endpoint: str, body: Any) -> tuple:
        if endpoint == "count_tokens":
            return 200, JSON_HEADERS, b'{"totalTokens": 42}'
        if endpoint == "models":
            return 200, JSON_HEADERS, json.dumps({"models": [{
                "name": f"models/{self.model_name}", "displayName": "e2e",
                "supportedGenerationMethods": ["generateContent", "countTokens"]}]}).encode()
        return super().side_answer(endpoint, body)

    def rate_limited(self) -> tuple:
        return 429, JSON_HEADERS, json.dumps({"error": {
            "code": 429, "message": "e2e upstream: resource exhausted",
            "status": "RESOURCE_EXHAUSTED"}}).encode()

    def parts(self, turn: Turn) -> list:
        calls = [{"functionCall": {"name": c.name, "args": c.args}} for c in turn.calls]
        if calls:
            calls[0]["thoughtSignature"] = self.signature   # Gemini 3: only the first call
        return calls

    @staticmethod
    def response(parts: list, finish: str = "", model: str = "") -> dict:
        candidate = {"content": {"role": "model", "parts": parts}, "index": 0}
        out = {"candidates": [candidate], "modelVersion": model, "responseId": "e2e-response"}
        if finish:
            candidate["finishReason"] = finish
            out["usageMetadata"] = {"promptTokenCount": 40, "candidatesTokenCount": 12,
                                    "totalTokenCount": 52}
        return out

    def answer(self, turn: Turn, view: View) -> tuple:
        model = view.model or self.model_name
        if not view.stream:
            parts = ([{"text": turn.text}] if turn.text else []) + self.parts(turn)
            return 200, JSON_HEADERS, [json.dumps(self.response(parts, "STOP", model)).encode()], False
        out = [sse("", self.response([{"text": piece}], "", model))
               for piece in turn.pieces or ((turn.text,) if turn.text else ())]
        out.append(sse("", self.response(self.parts(turn), "STOP", model)))
        return 200, SSE_HEADERS, out, True


# -- OpenAI Responses -------------------------------------------------------------------

class ResponsesUpstream(ScriptedUpstream):
    kind = "responses"
    model_name = "gpt-e2e-responses"

    def route(self, method: str, path: str) -> str:
        path = urllib.parse.urlsplit(path).path
        if path.rstrip("/").endswith("/responses"):
            return "turn"
        if path.rstrip("/").endswith("/models"):
            return "models"
        return "head" if method == "HEAD" else "unknown"

    def view(self, path: str, body: dict) -> View:
        tools = {}
        for tool in body.get("tools") or []:
            if tool.get("name"):
                tools[tool["name"]] = Tool(tool["name"], tool.get("parameters") or {},
                                           custom=tool.get("type") == "custom")
            elif tool.get("type") == "local_shell":
                tools["local_shell"] = Tool("local_shell", {})
        items = body.get("input") if isinstance(body.get("input"), list) else []
        results = [json.dumps(item.get("output")) for item in items if isinstance(item, dict)
                   and item.get("type") in ("function_call_output", "custom_tool_call_output",
                                            "local_shell_call_output")]
        fmt = (body.get("text") or {}).get("format") or {}
        schema = fmt.get("schema", {}) if fmt.get("type") == "json_schema" else None
        return View(tools, results, schema, bool(body.get("stream")), body.get("model", ""))

    def side_answer(self, endpoint: str, body: Any) -> tuple:
        if endpoint == "models":
            return 200, JSON_HEADERS, json.dumps({"object": "list", "data": [
                {"id": self.model_name, "object": "model", "created": 1, "owned_by": "e2e"}],
                "models": []}).encode()
        return super().side_answer(endpoint, body)

    def rate_limited(self) -> tuple:
        return 429, JSON_HEADERS, json.dumps({"error": {
            "message": "e2e upstream: rate limited", "type": "requests",
            "param": None, "code": "rate_limit_exceeded"}}).encode()

    def items(self, turn: Turn) -> list:
        items = []
        if turn.text:
            items.append({"id": f"msg_e2e{self.next_id()}", "type": "message", "status": "completed",
                          "role": "assistant",
                          "content": [{"type": "output_text", "text": turn.text, "annotations": []}]})
        for call in turn.calls:
            n = self.next_id()
            if call.custom:
                items.append({"id": f"ctc_e2e{n}", "type": "custom_tool_call", "status": "completed",
                              "call_id": f"call_e2e{n}", "name": call.name, "input": call.text})
            elif call.name == "local_shell":
                items.append({"id": f"lsh_e2e{n}", "type": "local_shell_call", "status": "completed",
                              "call_id": f"call_e2e{n}",
                              "action": {"type": "exec", "command": call.args["command"]}})
            else:
                items.append({"id": f"fc_e2e{n}", "type": "function_call", "status": "completed",
                              "call_id": f"call_e2e{n}", "name": call.name,
                              "arguments": json.dumps(call.args)})
        return items

    def response(self, items: list, model: str, status: str = "completed") -> dict:
        return {"id": "resp_e2e", "object": "response", "created_at": int(time.time()),
                "status": status, "error": None, "incomplete_details": None, "model": model,
                "output": items, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                "usage": {"input_tokens": 40, "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": 12, "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": 52} if status == "completed" else None}

    def events(self, turn: Turn, model: str) -> list:
        items = self.items(turn)
        seq = itertools.count()
        out = []

        def emit(kind: str, **data) -> None:
            out.append(sse(kind, dict({"type": kind, "sequence_number": next(seq)}, **data)))
        emit("response.created", response=self.response([], model, "in_progress"))
        emit("response.in_progress", response=self.response([], model, "in_progress"))
        for index, item in enumerate(items):
            ref = {"item_id": item["id"], "output_index": index}
            if item["type"] == "message":
                emit("response.output_item.added", output_index=index,
                     item=dict(item, status="in_progress", content=[]))
                part = {"type": "output_text", "text": "", "annotations": []}
                emit("response.content_part.added", content_index=0, part=part, **ref)
                for piece in turn.pieces or (turn.text,):
                    emit("response.output_text.delta", content_index=0, delta=piece, **ref)
                emit("response.output_text.done", content_index=0, text=turn.text, **ref)
                emit("response.content_part.done", content_index=0, part=dict(part, text=turn.text), **ref)
            elif item["type"] == "function_call":
                emit("response.output_item.added", output_index=index,
                     item=dict(item, status="in_progress", arguments=""))
                for piece in split_in_two(item["arguments"]):
                    emit("response.function_call_arguments.delta", delta=piece, **ref)
                emit("response.function_call_arguments.done", arguments=item["arguments"], **ref)
            elif item["type"] == "custom_tool_call":
                emit("response.output_item.added", output_index=index,
                     item=dict(item, status="in_progress", input=""))
                for piece in split_in_two(item["input"]):
                    emit("response.custom_tool_call_input.delta", delta=piece, **ref)
                emit("response.custom_tool_call_input.done", input=item["input"], **ref)
            else:
                emit("response.output_item.added", output_index=index, item=item)
            emit("response.output_item.done", output_index=index, item=item)
        emit("response.completed", response=self.response(items, model))
        return out

    def answer(self, turn: Turn, view: View) -> tuple:
        model = view.model or self.model_name
        if not view.stream:
            return 200, JSON_HEADERS, [json.dumps(self.response(self.items(turn), model)).encode()], False
        return 200, SSE_HEADERS, self.events(turn, model), True


KINDS = {cls.kind: cls for cls in (AnthropicUpstream, BedrockUpstream, OpenAIChatUpstream,
                                    GeminiUpstream, ResponsesUpstream)}
