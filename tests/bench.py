#!/usr/bin/env python3
"""tests/bench.py: what proxypal.py costs over talking to the upstream directly.

Three paths to the same mock upstream are measured side by side, in one run:
    direct   the load client talks to the mock itself
    relay    through a bare asyncio byte relay (accept, connect, copy bytes both
             ways): the floor a Python proxy can reach
    proxy    through proxypal.py, started as a subprocess the way a user starts it

For each path: non-stream requests/s and p50/p99 latency at concurrency 1, 16 and
32; for 200-event SSE streams, the time to the first event (p50) at concurrency 1
and events/s at concurrency 32; the CPU the relay and the proxy spend per request
and per event. For the proxy alone: cold start (spawn to the first answered
GET /health), RSS idle and with 500 streams held open at once, and the p50
latency it adds at concurrency 1. The whole measurement is repeated --runs times;
each cell shows min/median/max over the runs, and the targets are judged on the
medians.

Streams are also measured by client API and upstream API, the mock serving both
(an ampOpenaiProviders entry for model "m", a claudeApiKeys entry for "claude-m"):
    openai -> openai          pass-through (the streams above)
    anthropic -> anthropic    pass-through
    anthropic -> openai       translated: Anthropic client, OpenAI-compatible upstream
    openai -> anthropic       translated: OpenAI client, Anthropic upstream
Each: first event p50 at concurrency 1, and at concurrency 32 the events/s the
client receives and the upstream events/s (201 upstream events a stream over the
time taken). A translated stream's client sees a different number of events than
the upstream sent, so upstream events/s is the fair comparison with pass-through.
Direct numbers exist for the pass-through pairs only. Once a run, one stream and
one non-stream answer of each pair are parsed whole and checked (event order, text,
stop reason, model).

Run it:
    make bench                        # 3 runs, about 3 minutes
    python3 tests/bench.py --runs 5 --duration 3
    python3 tests/bench.py --quick    # one short run: a smoke test

The mock upstream and the relay run in child processes of this script
(`--serve mock|relay`), so the load client, the mock, the relay and the proxy each
have their own event loop; on a 2-core machine they still share the CPUs, which is
also true of a real laptop. Standard library only; loopback only; Linux /proc for
RSS and CPU (skipped with a message elsewhere). The bench reports, it does not
assert: it exits 0 even when a target fails, non-zero only when it broke.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Awaitable, Callable, Dict, List, NamedTuple, Optional, Set, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
PROXYPAL = os.path.join(os.path.dirname(HERE), "proxypal.py")

HOST = "127.0.0.1"                 # loopback only, everywhere
LOCAL_KEY = "proxypal-local"       # the proxy's default local key
MODEL = "m"                        # served by the ampOpenaiProviders entry
CLAUDE_MODEL = "claude-m"          # served by the claudeApiKeys entry (same mock)
ANTHROPIC_VERSION = "2023-06-01"
STREAM_EVENTS = 200                # chat.completion.chunk events per stream, then [DONE]
UPSTREAM_EVENTS = STREAM_EVENTS + 1   # SSE events in one mock stream, in either format
ANTHROPIC_DELTAS = UPSTREAM_EVENTS - 5   # text_delta events: the other five are message_start,
                                         # content_block_start/stop, message_delta, message_stop
HELD_STREAMS = 500                 # streams held open at once for the RSS measurement
HOLD_WAVE = 50                     # held streams opened at a time: listen backlogs are finite
CONCURRENCIES = (1, 16, 32)        # non-stream load points
STREAM_CONCURRENCY = 32            # events/s load point
DURATION = 2.0                     # seconds per load point
QUICK_DURATION = 0.5
TIMEOUT = 10.0                     # a connect, a request, a startup: nothing waits longer
IDLE_TIMEOUT = 60.0                # the mock and the relay close connections silent this long
READ_SIZE = 64 * 1024
PATHS = ("direct", "relay", "proxy")

TARGETS_TEXT = (
    "added p50 latency at c=1 <= 0.5 ms (non-stream and first stream event); "
    "non-stream req/s at c=16 >= 20% of direct; stream events/s at c=32 >= 40% of direct; "
    "cold start < 0.3 s; RSS < 30 MB idle and < 60 MB with 500 open streams; "
    "translated streams (anthropic client on an openai upstream, and the reverse): "
    "upstream events/s at c=32 >= 50% of the same client's pass-through")


class BenchError(Exception):
    """The bench itself broke (not: a target was missed)."""


# =============================================================================
# Mock upstream (child process), two APIs:
#   POST /v1/chat/completions   OpenAI format
#   POST /v1/messages           Anthropic format (a claudeApiKeys baseUrl without /v1)
# A body with "stream": true gets an SSE stream of UPSTREAM_EVENTS events (OpenAI:
# STREAM_EVENTS chunk events and [DONE]; Anthropic: message_start,
# content_block_start, ANTHROPIC_DELTAS text deltas, content_block_stop,
# message_delta with usage, message_stop), each event its own HTTP chunk, written
# and drained one by one. With "bench_hold": true as well, the stream stops after its
# first event and the connection stays open until the other side closes it. A request
# either API would refuse (no messages; Anthropic: no max_tokens or anthropic-version)
# gets a 400, so a translation that drops them shows up as failed requests.
# =============================================================================

def json_response(status: str, obj: Dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    head = (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


def completion_response() -> bytes:
    return json_response("200 OK", {
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    })


def message_response() -> bytes:
    return json_response("200 OK", {
        "id": "msg_bench", "type": "message", "role": "assistant", "model": CLAUDE_MODEL,
        "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn",
        "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 2},
    })


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")


def stream_chunks() -> List[bytes]:
    """The whole streamed response: the head, one HTTP chunk per SSE event, the end."""
    chunks = [SSE_HEAD]
    for i in range(STREAM_EVENTS):
        last = i == STREAM_EVENTS - 1
        event = {"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                 "created": 1700000000, "model": MODEL,
                 "choices": [{"index": 0, "delta": {} if last else {"content": f"tok{i} "},
                              "finish_reason": "stop" if last else None}]}
        chunks.append(http_chunk(b"data: " + json.dumps(event).encode() + b"\n\n"))
    chunks.append(http_chunk(b"data: [DONE]\n\n"))
    chunks.append(b"0\r\n\r\n")
    return chunks


def anthropic_stream_chunks() -> List[bytes]:
    """The same, as Anthropic Messages events (`event: X` and `data: {...}`)."""
    message = {"id": "msg_bench", "type": "message", "role": "assistant", "content": [],
               "model": CLAUDE_MODEL, "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": 5, "output_tokens": 1}}
    events: List[Dict[str, Any]] = [
        {"type": "message_start", "message": message},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}]
    events += [{"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": f"tok{i} "}}
               for i in range(ANTHROPIC_DELTAS)]
    events += [{"type": "content_block_stop", "index": 0},
               {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": ANTHROPIC_DELTAS}},
               {"type": "message_stop"}]
    chunks = [SSE_HEAD]
    for event in events:
        chunks.append(http_chunk(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()))
    chunks.append(b"0\r\n\r\n")
    return chunks


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def refusal(api: str, message: str) -> bytes:
    if api == "anthropic":
        return json_response("400 Bad Request", {"type": "error", "error": {
            "type": "invalid_request_error", "message": message}})
    return json_response("400 Bad Request", {"error": {
        "message": message, "type": "invalid_request_error", "code": None}})


def mock_problem(api: str, head: bytes, request: Dict[str, Any]) -> str:
    """Why the real API would refuse this request ("" if it would not)."""
    if not isinstance(request.get("messages"), list) or not request["messages"]:
        return "messages: a non-empty list is required"
    if api == "anthropic":
        if not isinstance(request.get("max_tokens"), int):
            return "max_tokens: Field required"
        if b"\nanthropic-version:" not in head.lower():
            return "anthropic-version: header is required"
    return ""


NOT_FOUND = (b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\n"
             b"not found")
COMPLETION = completion_response()
STREAM = stream_chunks()
MOCK_ROUTES = {                        # request line start -> (API, non-stream answer, stream)
    b"POST /v1/chat/completions ": ("openai", COMPLETION, STREAM),
    b"POST /v1/messages ": ("anthropic", message_response(), anthropic_stream_chunks()),
}


class IdleTimer:
    """Closes the given writers when touch() has not been called for IDLE_TIMEOUT."""

    def __init__(self, *writers: asyncio.StreamWriter):
        self.writers = writers
        self.handle: Optional[asyncio.TimerHandle] = None
        self.touch()

    def touch(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.handle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self.close)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        for writer in self.writers:
            writer.close()


def content_length(head: bytes) -> int:
    match = re.search(rb"\r\ncontent-length:[ \t]*(\d+)", head, re.IGNORECASE)
    return int(match.group(1)) if match else 0


async def mock_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    idle = IdleTimer(writer)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.readexactly(content_length(head))
            idle.touch()
            request = json.loads(body) if body else {}
            route = next((r for line, r in MOCK_ROUTES.items() if head.startswith(line)), None)
            problem = mock_problem(route[0], head, request) if route else ""
            if route is None:
                writer.write(NOT_FOUND)
            elif problem:
                writer.write(refusal(route[0], problem))
            elif request.get("stream") is True and request.get("bench_hold") is True:
                await mock_held_stream(reader, writer, route[2])
                return
            elif request.get("stream") is True:
                for data in route[2]:
                    writer.write(data)
                    await writer.drain()
            else:
                writer.write(route[1])
            await writer.drain()
            idle.touch()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    except asyncio.CancelledError:
        pass                               # the child is stopping; nothing to clean up
    finally:
        idle.close()


async def mock_held_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           chunks: List[bytes]) -> None:
    """The head and the first event, then nothing until the other side closes."""
    writer.write(chunks[0] + chunks[1])
    await writer.drain()
    while await reader.read(READ_SIZE):
        pass


# =============================================================================
# Bare relay (child process): the floor a Python proxy can reach.
# =============================================================================

async def relay_connection(upstream_port: int, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
    try:
        up_reader, up_writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, upstream_port), TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        writer.close()
        return
    idle = IdleTimer(writer, up_writer)
    try:
        await asyncio.gather(copy_bytes(reader, up_writer, idle),
                             copy_bytes(up_reader, writer, idle))
    except asyncio.CancelledError:
        pass                               # the child is stopping; nothing to clean up
    finally:
        idle.close()


async def copy_bytes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     idle: IdleTimer) -> None:
    """Copy until EOF, then close both sides (which ends the other direction too)."""
    try:
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                break
            idle.touch()
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        idle.close()


def serve_child(role: str, upstream_port: int) -> int:
    """Run the mock or the relay; print the port; stop when stdin closes (the bench
    holds the other end, so a child never outlives the bench)."""
    async def run() -> None:
        if role == "mock":
            handler = mock_connection
        else:
            def handler(reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> Awaitable[None]:
                return relay_connection(upstream_port, reader, writer)
        server = await asyncio.start_server(handler, HOST, 0, backlog=HELD_STREAMS * 2)
        print(server.sockets[0].getsockname()[1], flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def wait_for_stdin_eof() -> None:
            sys.stdin.buffer.read()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_for_stdin_eof, daemon=True).start()
        await stop.wait()
        server.close()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


# =============================================================================
# Child processes: spawn, read the port, stop; RSS and CPU from /proc.
# =============================================================================

def read_first_line(proc: subprocess.Popen, timeout: float, what: str) -> str:
    """The first line the child prints on stdout (unbuffered pipe), within timeout."""
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise BenchError(f"{what} printed no port line within {timeout:g}s")
        more = os.read(fd, 4096)
        if not more:
            raise BenchError(f"{what} exited with code {proc.wait(TIMEOUT)} "
                             "before printing its port")
        data += more
    return data.split(b"\n", 1)[0].decode("utf-8", "replace")


def start_server_child(role: str, upstream_port: int = 0) -> Tuple[subprocess.Popen, int]:
    argv = [sys.executable, os.path.abspath(__file__), "--serve", role,
            "--upstream-port", str(upstream_port)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    try:
        return proc, int(read_first_line(proc, TIMEOUT, role))
    except BaseException:
        stop_child(proc)
        raise


def stop_child(proc: subprocess.Popen) -> None:
    """Close its stdin (our children stop on that), else SIGTERM; SIGKILL if it has
    not stopped within TIMEOUT or if we are interrupted while waiting."""
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()
    try:
        if proc.stdin is not None:
            try:
                proc.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            proc.terminate()
            proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def write_proxy_config(directory: str, mock_port: int) -> str:
    path = os.path.join(directory, "config.json")
    with open(path, "w") as f:
        json.dump({
            "ampOpenaiProviders": [{
                "name": "mock", "baseUrl": f"http://{HOST}:{mock_port}/v1", "apiKey": "k",
                "models": [MODEL]}],
            "claudeApiKeys": [{                # no /v1: the proxy appends /v1/messages
                "baseUrl": f"http://{HOST}:{mock_port}", "apiKey": "k",
                "models": [{"name": CLAUDE_MODEL, "alias": CLAUDE_MODEL}]}]}, f)
    return path


class Proxy(NamedTuple):
    proc: subprocess.Popen
    port: int
    cold_start: float                  # seconds from spawn to the first answered request


def start_proxy(config_path: str, log_path: str) -> Proxy:
    """Spawn proxypal.py on an ephemeral port; time spawn to the first /health 200."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYPAL_")}
    argv = [sys.executable, PROXYPAL, "--config", config_path, "--port", "0"]
    with open(log_path, "ab") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=log, env=env, bufsize=0)
    try:
        line = read_first_line(proc, TIMEOUT, "proxypal.py")
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if not match:
            raise BenchError(f"unexpected proxypal banner {line!r}")
        port = int(match.group(1))
        wait_for_health(port, t0 + TIMEOUT)
        return Proxy(proc, port, time.perf_counter() - t0)
    except BenchError as exc:
        stop_child(proc)
        raise BenchError(f"{exc}{log_tail(log_path)}") from None
    except BaseException:
        stop_child(proc)
        raise


def log_tail(path: str, lines: int = 10) -> str:
    try:
        with open(path, errors="replace") as f:
            tail = f.read().splitlines()[-lines:]
    except OSError:
        return ""
    return "".join(f"\n  proxypal.py: {line}" for line in tail)


def wait_for_health(port: int, deadline: float) -> None:
    """Poll GET /health with a blocking socket until it answers 200."""
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=TIMEOUT) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Connection: close\r\n\r\n")
                head = b""
                while b"\r\n" not in head:
                    more = sock.recv(4096)
                    if not more:
                        break
                    head += more
            if head.startswith(b"HTTP/1.1 200 "):
                return
        except OSError:
            pass
        if time.perf_counter() > deadline:
            raise BenchError(f"proxypal.py did not answer GET /health within {TIMEOUT:g}s")
        time.sleep(0.002)


def proc_status(pid: int, field: str) -> Optional[int]:
    """A number from /proc/<pid>/status (VmRSS in kB, Threads); None without /proc."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def open_fds(pid: int) -> Optional[int]:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def rss_mb(pid: int) -> Optional[float]:
    kb = proc_status(pid, "VmRSS")
    return None if kb is None else kb / 1024


def cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU time of a process so far, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raise_fd_limit(needed: int) -> None:
    """Lift the soft RLIMIT_NOFILE for this process (children inherit it)."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


# =============================================================================
# Load client: raw HTTP/1.1 over keep-alive connections.
# =============================================================================

class BadResponse(Exception):
    pass


# What a request can fail with; the bench records these and carries on.
CLIENT_ERRORS = (BadResponse, OSError, ValueError, asyncio.IncompleteReadError,
                 asyncio.LimitOverrunError)


class Call(NamedTuple):
    """A request the load client repeats, in the API it speaks, and what a good answer
    looks like: for a stream, the least and most SSE events it may have."""
    api: str                           # "openai" (/v1/chat/completions) or "anthropic"
    payload: Dict[str, object]
    min_events: int = UPSTREAM_EVENTS
    max_events: int = UPSTREAM_EVENTS

    @property
    def stream(self) -> bool:
        return self.payload.get("stream") is True


def chat_call(api: str, model: str, stream: bool, **extra: object) -> Call:
    payload: Dict[str, object] = {"model": model,
                                  "messages": [{"role": "user", "content": "Say hello."}]}
    if api == "anthropic":
        payload["max_tokens"] = 256
    if stream:
        payload["stream"] = True
    return Call(api, dict(payload, **extra))


def request_bytes(port: int, call: Call) -> bytes:
    body = json.dumps(call.payload).encode()
    if call.api == "anthropic":
        target = "/v1/messages"
        auth = f"x-api-key: {LOCAL_KEY}\r\nanthropic-version: {ANTHROPIC_VERSION}\r\n"
    else:
        target, auth = "/v1/chat/completions", f"Authorization: Bearer {LOCAL_KEY}\r\n"
    head = (f"POST {target} HTTP/1.1\r\nHost: {HOST}:{port}\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


CHAT = chat_call("openai", MODEL, False)
STREAMED_CHAT = chat_call("openai", MODEL, True)
HELD_CHAT = chat_call("openai", MODEL, True, bench_hold=True)


class Body:
    """A response body as it arrives: the SSE events in it (blank-line separators),
    when the first one came, its first and last bytes for checks and error messages,
    and whether an error object went by."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.events = 0
        self.first_event: Optional[float] = None
        self.start = b""
        self.tail = b""
        self.error = False

    def feed(self, data: bytes) -> None:
        self.events += (self.tail[-1:] + data).count(b"\n\n")
        if self.events and self.first_event is None:
            self.first_event = time.perf_counter() - self.t0
        if len(self.start) < 4096:
            self.start += data[:4096]
        self.tail = (self.tail + data)[-512:]
        self.error = self.error or b'"error"' in data

    def last_event(self) -> bytes:
        return self.tail.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]


def stream_problem(call: Call, body: Body) -> str:
    """Why a streamed answer is not what the client's API promises ("" if it is): the
    event count in range, no error event, and the right first and last event."""
    if call.api == "anthropic":
        shape = "message_start ... message_stop"
        good = (body.start.startswith(b"event: message_start\n")
                and body.last_event().startswith(b"event: message_stop\n"))
    else:
        shape = "chunks ... [DONE]"
        good = body.last_event() == b"data: [DONE]"
    if good and not body.error and call.min_events <= body.events <= call.max_events:
        return ""
    expected = (str(call.min_events) if call.min_events == call.max_events
                else f"{call.min_events}-{call.max_events}")
    return (f"stream with {body.events} events{', an error among them' if body.error else ''}, "
            f"expected {expected}: {shape}; starts {body.start[:60]!r}, ends {body.tail[-80:]!r}")


class Sample(NamedTuple):
    latency: float                     # request written to last body byte read, seconds
    first_event: Optional[float]       # request written to first complete SSE event
    events: int


class Client:
    """One keep-alive HTTP/1.1 connection; responses framed by Content-Length or chunked."""

    def __init__(self, port: int, call: Call):
        self.port = port
        self.call = call
        self.request = request_bytes(port, call)
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def send(self) -> Tuple[int, Dict[str, str]]:
        """Write the request; return the response status and headers (lower-case names)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise BadResponse(f"malformed status line {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    async def read_body(self, headers: Dict[str, str], sink: Callable[[bytes], None]) -> None:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                data = await self.read_chunk()
                if not data:
                    break
                sink(data)
        elif "content-length" in headers:
            sink(await self.reader.readexactly(int(headers["content-length"])))
        else:
            sink(await self.reader.read())            # delimited by the close
            self.close()
            return
        if "close" in headers.get("connection", "").lower():
            self.close()

    async def read_chunk(self) -> bytes:
        """The next chunk's data; b"" for the last chunk (its trailers are skipped)."""
        line = await self.reader.readuntil(b"\r\n")
        try:
            size = int(line.split(b";")[0], 16)
        except ValueError:
            raise BadResponse(f"malformed chunk size line {line[:40]!r}") from None
        if size == 0:
            while await self.reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return b""
        data = await self.reader.readexactly(size + 2)
        if data[-2:] != b"\r\n":
            raise BadResponse("chunk data not followed by CRLF")
        return data[:-2]

    async def exchange(self) -> Sample:
        """One request and its whole response, checked: 200, and a complete answer."""
        t0 = time.perf_counter()
        status, headers = await self.send()
        body = Body(t0)
        await self.read_body(headers, body.feed)
        latency = time.perf_counter() - t0
        if status != 200:
            raise BadResponse(f"HTTP {status}: {body.start[:300]!r}")
        if self.call.stream:
            problem = stream_problem(self.call, body)
            if problem:
                raise BadResponse(problem)
        elif self.call.api == "openai" and b"chat.completion" not in body.start:
            raise BadResponse(f"not a chat.completion: {body.start[:300]!r}")
        elif self.call.api == "anthropic" and b'"message"' not in body.start:
            raise BadResponse(f"not an Anthropic message: {body.start[:300]!r}")
        return Sample(latency, body.first_event, body.events)

    async def hold_stream(self) -> None:
        """Start a held stream and return once its first event has arrived."""
        status, headers = await self.send()
        if status != 200 or headers.get("transfer-encoding", "").lower() != "chunked":
            raise BadResponse(f"held stream answered HTTP {status} {headers}")
        body = Body(0.0)
        while not body.events:
            data = await self.read_chunk()
            if not data:
                raise BadResponse("held stream ended before its first event")
            body.feed(data)


class Phase(NamedTuple):
    samples: List[Sample]
    errors: List[str]
    elapsed: float                     # seconds from the start until every worker stopped
    cpu: Optional[float]               # CPU seconds the watched process spent meanwhile


async def worker(client: Client, deadline: float, samples: List[Sample],
                 errors: List[str]) -> None:
    """Requests back to back until the deadline (at least one); errors are kept, and
    the connection is reopened after one."""
    while True:
        try:
            samples.append(await client.exchange())
        except CLIENT_ERRORS as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            client.close()
        if time.perf_counter() >= deadline:
            return


async def run_load(port: int, call: Call, concurrency: int, duration: float,
                   watch_pid: Optional[int]) -> Phase:
    """`concurrency` connections sending requests back to back for `duration` seconds,
    after one warm-up request each (it opens the connections and the proxy's pool)."""
    clients = [Client(port, call) for _ in range(concurrency)]
    try:
        warm_errors: List[str] = []
        await bounded(TIMEOUT, "warm-up", *(worker(c, 0.0, [], warm_errors) for c in clients))
        samples: List[Sample] = []
        errors = [f"warm-up: {e}" for e in warm_errors]
        cpu0 = cpu_seconds(watch_pid) if watch_pid else None
        t0 = time.perf_counter()
        await bounded(duration + TIMEOUT, "load",
                      *(worker(c, t0 + duration, samples, errors) for c in clients))
        elapsed = time.perf_counter() - t0
        cpu1 = cpu_seconds(watch_pid) if watch_pid else None
    finally:
        for client in clients:
            client.close()
    if not samples:
        raise BenchError(f"no request succeeded on port {port}: {errors[:3]}")
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return Phase(samples, errors, elapsed, cpu)


async def bounded(timeout: float, what: str, *coros: Awaitable[Any]) -> None:
    """Run coros concurrently; BenchError if they have not all finished within timeout."""
    async def together() -> None:
        await asyncio.gather(*coros)

    try:
        await asyncio.wait_for(together(), timeout)
    except asyncio.TimeoutError:
        raise BenchError(f"{what} did not finish within {timeout:g}s") from None


async def hold_streams(port: int, count: int) -> List[Client]:
    """`count` streams open at once, each past its first event; the caller closes them."""
    clients = [Client(port, HELD_CHAT) for _ in range(count)]
    wave = asyncio.Semaphore(HOLD_WAVE)

    async def hold(client: Client) -> None:
        async with wave:
            await client.hold_stream()

    try:
        await bounded(3 * TIMEOUT, f"opening {count} streams", *(hold(c) for c in clients))
    except CLIENT_ERRORS as exc:
        close_all(clients)
        raise BenchError(f"could not hold {count} streams open: {type(exc).__name__}: "
                         f"{exc}") from None
    except BaseException:
        close_all(clients)
        raise
    return clients


def close_all(clients: List[Client]) -> None:
    for client in clients:
        client.close()


# =============================================================================
# Stream pairs: the API the client speaks, the API the model's upstream speaks.
# =============================================================================

def text_deltas(upstream: str) -> int:
    """Events carrying text in one mock stream (the last OpenAI chunk only finishes)."""
    return STREAM_EVENTS - 1 if upstream == "openai" else ANTHROPIC_DELTAS


def upstream_text(upstream: str) -> str:
    return "".join(f"tok{i} " for i in range(text_deltas(upstream)))


class StreamPair(NamedTuple):
    client: str                        # "openai" or "anthropic"
    upstream: str

    @property
    def label(self) -> str:
        return f"{self.client} -> {self.upstream}"

    @property
    def translated(self) -> bool:
        return self.client != self.upstream

    @property
    def model(self) -> str:
        return MODEL if self.upstream == "openai" else CLAUDE_MODEL

    def call(self, stream: bool = True) -> Call:
        call = chat_call(self.client, self.model, stream)
        if stream and self.translated:
            # Translated events are re-framed: every text delta, plus at least the frame
            # of the client's API (Anthropic: message_start, content_block_start/stop,
            # message_delta, message_stop; OpenAI: a finish chunk and [DONE]).
            least = text_deltas(self.upstream) + (5 if self.client == "anthropic" else 2)
            call = call._replace(min_events=least, max_events=4 * UPSTREAM_EVENTS)
        return call


PAIRS = (StreamPair("openai", "openai"), StreamPair("anthropic", "anthropic"),
         StreamPair("anthropic", "openai"), StreamPair("openai", "anthropic"))


# =============================================================================
# One run: every measurement once, against a freshly started proxy.
# =============================================================================

def percentile(values: List[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


class Results:
    """metric -> path -> one value per run; metrics keep the order they were added in."""

    def __init__(self) -> None:
        self.values: Dict[str, Dict[str, List[float]]] = {}
        self.pairs: Dict[str, Dict[str, Dict[str, List[float]]]] = {}   # pair label -> the same
        self.errors: Dict[str, List[str]] = {}
        self.failed: Set[str] = set()     # metrics the proxy failed before they could be measured
        self.notes: List[str] = []

    def add(self, metric: str, path: str, value: Optional[float]) -> None:
        if value is not None:
            self.values.setdefault(metric, {}).setdefault(path, []).append(value)

    def median(self, metric: str, path: str) -> Optional[float]:
        runs = self.values.get(metric, {}).get(path)
        return statistics.median(runs) if runs else None

    def add_pair(self, pair: "StreamPair", metric: str, path: str, value: Optional[float]) -> None:
        if value is not None:
            table = self.pairs.setdefault(pair.label, {})
            table.setdefault(metric, {}).setdefault(path, []).append(value)

    def pair_median(self, pair: "StreamPair", metric: str, path: str) -> Optional[float]:
        runs = self.pairs.get(pair.label, {}).get(metric, {}).get(path)
        return statistics.median(runs) if runs else None

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def measure_load(results: Results, ports: Dict[str, int], pids: Dict[str, int],
                       duration: float) -> None:
    for c in CONCURRENCIES:
        progress(f"  non-stream c={c}")
        for path in PATHS:
            phase = await run_load(ports[path], CHAT, c, duration, pids.get(path))
            record_errors(results, f"non-stream c={c}", path, phase.errors)
            latencies = [s.latency * 1000 for s in phase.samples]
            results.add(f"non-stream req/s c={c}", path, len(phase.samples) / phase.elapsed)
            results.add(f"non-stream p50 ms c={c}", path, percentile(latencies, 0.50))
            results.add(f"non-stream p99 ms c={c}", path, percentile(latencies, 0.99))
            if phase.cpu is not None and c == 16:
                results.add("CPU us/request c=16", path, phase.cpu / len(phase.samples) * 1e6)
    for pair in PAIRS:
        await measure_streams(results, pair, ports, pids, duration)
    for path in ("relay", "proxy"):
        for metric, label in (("non-stream p50 ms c=1", "added p50 ms c=1, non-stream"),
                              ("stream first event p50 ms c=1", "added p50 ms c=1, first event")):
            mine, direct = results.values[metric][path][-1], results.values[metric]["direct"][-1]
            results.add(label, path, mine - direct)


FIRST_EVENT = "first event p50 ms c=1"
CLIENT_EVENTS = "client events per stream"
CLIENT_RATE = f"client events/s c={STREAM_CONCURRENCY}"
UPSTREAM_RATE = f"upstream events/s c={STREAM_CONCURRENCY}"
PAIR_CPU = f"CPU us/upstream event c={STREAM_CONCURRENCY}"


async def measure_streams(results: Results, pair: StreamPair, ports: Dict[str, int],
                          pids: Dict[str, int], duration: float) -> None:
    """First event p50 at c=1, events/s at STREAM_CONCURRENCY: for the proxy, and
    direct where the client's API is the upstream's. The first pair (OpenAI pass-through)
    also fills the main table, relay included. A pair the proxy cannot serve at all is
    recorded as failed, and the run goes on."""
    main = pair == PAIRS[0]
    paths = PATHS if main else ("proxy",) if pair.translated else ("direct", "proxy")
    call = pair.call()

    async def load(path: str, concurrency: int, watch: Optional[int]) -> Optional[Phase]:
        phase_name = f"stream {pair.label} c={concurrency}"
        try:
            phase = await run_load(ports[path], call, concurrency, duration, watch)
        except BenchError as exc:
            if main:
                raise
            record_errors(results, phase_name, path, [str(exc)])
            for judged in PAIRS:           # this pair's target, or the ones it is the base of
                if judged == pair or (not pair.translated and judged.client == pair.client):
                    results.failed.add(f"{judged.label}: {UPSTREAM_RATE}")
            return None
        record_errors(results, phase_name, path, phase.errors)
        return phase

    progress(f"  stream {pair.label} c=1")
    for path in paths:
        phase = await load(path, 1, None)
        if phase is None:
            continue
        firsts = [s.first_event * 1000 for s in phase.samples if s.first_event is not None]
        first = percentile(firsts, 0.50) if firsts else None
        results.add_pair(pair, FIRST_EVENT, path, first)
        if main:
            results.add("stream first event p50 ms c=1", path, first)
    progress(f"  stream {pair.label} c={STREAM_CONCURRENCY}")
    for path in paths:
        phase = await load(path, STREAM_CONCURRENCY, pids.get(path))
        if phase is None:
            continue
        streams, events = len(phase.samples), sum(s.events for s in phase.samples)
        upstream_events = streams * UPSTREAM_EVENTS
        results.add_pair(pair, CLIENT_EVENTS, path, events / streams)
        results.add_pair(pair, CLIENT_RATE, path, events / phase.elapsed)
        results.add_pair(pair, UPSTREAM_RATE, path, upstream_events / phase.elapsed)
        if phase.cpu is not None and path != "direct":
            results.add_pair(pair, PAIR_CPU, path, phase.cpu / upstream_events * 1e6)
        if main:
            results.add(f"stream events/s c={STREAM_CONCURRENCY}", path, events / phase.elapsed)
            if phase.cpu is not None:
                results.add(f"CPU us/event c={STREAM_CONCURRENCY}", path,
                            phase.cpu / events * 1e6)


async def check_shapes(results: Results, ports: Dict[str, int]) -> None:
    """One non-stream and one streamed answer of every pair, read whole and checked
    (direct too where the APIs match: a check of the mock itself)."""
    for pair in PAIRS:
        for path in ("proxy",) if pair.translated else ("direct", "proxy"):
            for stream in (False, True):
                problem = await shape_problem(ports[path], pair, stream)
                if problem:
                    kind = "stream" if stream else "non-stream"
                    record_errors(results, f"shape check, {pair.label} {kind}", path, [problem])


async def shape_problem(port: int, pair: StreamPair, stream: bool) -> str:
    """What is wrong with one answer ("" if nothing)."""
    client = Client(port, pair.call(stream))
    parts: List[bytes] = []
    try:
        status, headers = await asyncio.wait_for(client.send(), TIMEOUT)
        await asyncio.wait_for(client.read_body(headers, parts.append), TIMEOUT)
    except CLIENT_ERRORS + (asyncio.TimeoutError,) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    body = b"".join(parts)
    if status != 200:
        return f"HTTP {status}: {body[:300]!r}"
    try:
        problems = (stream_shape if stream else message_shape)(pair, body)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        problems = [f"unreadable ({type(exc).__name__}: {exc})"]
    if not problems:
        return ""
    return "; ".join(problems) + f"; body starts {body[:120]!r}, ends {body[-120:]!r}"


def message_shape(pair: StreamPair, body: bytes) -> List[str]:
    obj = json.loads(body)
    if pair.client == "openai":
        choice = obj["choices"][0]
        got = {"object": obj.get("object"), "model": obj.get("model"),
               "role": choice["message"].get("role"), "text": choice["message"].get("content"),
               "finish_reason": choice.get("finish_reason")}
        want = {"object": "chat.completion", "model": pair.model, "role": "assistant",
                "text": "Hello!", "finish_reason": "stop"}
    else:
        got = {"type": obj.get("type"), "model": obj.get("model"), "role": obj.get("role"),
               "blocks": [b.get("type") for b in obj["content"]],
               "text": "".join(b.get("text", "") for b in obj["content"]),
               "stop_reason": obj.get("stop_reason")}
        want = {"type": "message", "model": pair.model, "role": "assistant", "blocks": ["text"],
                "text": "Hello!", "stop_reason": "end_turn"}
    return differences(got, want)


def stream_shape(pair: StreamPair, body: bytes) -> List[str]:
    """Event order and framing of the client's API, the whole text, the stop reason, the
    model asked for, and output tokens where the upstream reported them."""
    events = sse_events(body)
    if pair.client == "anthropic":
        objs = [json.loads(data) for _, data in events]
        names = [name for name, _ in events if name != "ping"]

        def of(kind: str) -> List[Dict[str, Any]]:
            return [o for o in objs if o.get("type") == kind]
        message_delta = (of("message_delta") or [{}])[-1]
        got: Dict[str, Any] = {
            "first": names[:1], "last two": names[-2:],
            "event name != data type": [n for (n, _), o in zip(events, objs) if o.get("type") != n],
            "blocks": [o["content_block"]["type"] for o in of("content_block_start")],
            "block stops": len(of("content_block_stop")),
            "model": (of("message_start") or [{}])[0].get("message", {}).get("model"),
            "text": "".join(o["delta"].get("text", "") for o in of("content_block_delta")),
            "stop_reason": message_delta.get("delta", {}).get("stop_reason")}
        want: Dict[str, Any] = {
            "first": ["message_start"], "last two": ["message_delta", "message_stop"],
            "event name != data type": [], "blocks": ["text"], "block stops": 1,
            "model": pair.model, "text": upstream_text(pair.upstream), "stop_reason": "end_turn"}
        if pair.upstream == "anthropic":
            got["output_tokens"] = message_delta.get("usage", {}).get("output_tokens")
            want["output_tokens"] = ANTHROPIC_DELTAS
    else:
        datas = [data for _, data in events]
        chunks = [json.loads(data) for data in datas if data != "[DONE]"]
        choices = [c["choices"][0] for c in chunks if c.get("choices")]
        got = {"last": datas[-1:], "[DONE] count": datas.count("[DONE]"),
               "objects": sorted({str(c.get("object")) for c in chunks}),
               "models": sorted({str(c.get("model")) for c in chunks}),
               "text": "".join(ch.get("delta", {}).get("content") or "" for ch in choices),
               "finish_reasons": [ch["finish_reason"] for ch in choices if ch.get("finish_reason")]}
        want = {"last": ["[DONE]"], "[DONE] count": 1, "objects": ["chat.completion.chunk"],
                "models": [pair.model], "text": upstream_text(pair.upstream),
                "finish_reasons": ["stop"]}
        if pair.upstream == "anthropic":
            usage = [c["usage"] for c in chunks if isinstance(c.get("usage"), dict)]
            got["completion_tokens"] = usage[-1].get("completion_tokens") if usage else None
            want["completion_tokens"] = ANTHROPIC_DELTAS
    return differences(got, want)


def sse_events(body: bytes) -> List[Tuple[str, str]]:
    """(event name, data) of each SSE event; comments skipped."""
    events = []
    for block in body.decode("utf-8").split("\n\n"):
        name, data = "", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[6:] if line.startswith("data: ") else line[5:])
        if name or data:
            events.append((name, "\n".join(data)))
    return events


def differences(got: Dict[str, Any], want: Dict[str, Any]) -> List[str]:
    out = []
    for key, expected in want.items():
        value = got.get(key)
        if value == expected:
            continue
        if isinstance(value, str) and isinstance(expected, str) and len(expected) > 40:
            i = next((i for i, (a, b) in enumerate(zip(value, expected)) if a != b),
                     min(len(value), len(expected)))
            out.append(f"{key}: {len(value)} chars, expected {len(expected)}; from char {i} "
                       f"{value[i:i + 30]!r}, expected {expected[i:i + 30]!r}")
        else:
            out.append(f"{key}: {str(value)[:100]}, expected {str(expected)[:100]}")
    return out


def record_errors(results: Results, phase: str, path: str, errors: List[str]) -> None:
    if errors:
        results.errors.setdefault(f"{path}, {phase}", []).extend(errors)


async def measure_held_streams(results: Results, ports: Dict[str, int],
                               pids: Dict[str, int]) -> None:
    """RSS and threads with HELD_STREAMS streams open; then the fds left once the
    clients have closed them (a server that frees what it held is back near idle)."""
    for path in ("relay", "proxy"):
        progress(f"  {HELD_STREAMS} held streams via {path}")
        try:
            clients = await hold_streams(ports[path], HELD_STREAMS)
        except BenchError as exc:
            if path == "proxy":
                results.failed.add(f"RSS MB, {HELD_STREAMS} open streams")
            record_errors(results, f"{HELD_STREAMS} held streams", path, [str(exc)])
            continue
        try:
            await asyncio.sleep(0.2)               # let the last reads settle
            results.add(f"RSS MB, {HELD_STREAMS} open streams", path, rss_mb(pids[path]))
            results.add(f"threads, {HELD_STREAMS} open streams", path,
                        proc_status(pids[path], "Threads"))
        finally:
            close_all(clients)
        await asyncio.sleep(1.0)                   # the servers notice the closes
        results.add("open fds 1 s after the streams closed", path, open_fds(pids[path]))


async def warm_up_proxy(port: int) -> None:
    """One non-stream and one streamed request, so "idle" means imported and used."""
    for call in (CHAT, STREAMED_CHAT):
        client = Client(port, call)
        try:
            await bounded(TIMEOUT, "first proxy request", client.exchange())
        except CLIENT_ERRORS as exc:
            raise BenchError(f"the proxy failed its first request: {type(exc).__name__}: "
                             f"{exc}") from None
        finally:
            client.close()


def one_run(results: Results, config_path: str, log_path: str, ports: Dict[str, int],
            pids: Dict[str, int], duration: float) -> None:
    progress("  proxy cold start")
    proxy = start_proxy(config_path, log_path)
    try:
        results.add("proxy cold start ms", "proxy", proxy.cold_start * 1000)
        ports = dict(ports, proxy=proxy.port)
        pids = dict(pids, proxy=proxy.proc.pid)
        asyncio.run(warm_up_proxy(proxy.port))
        time.sleep(0.2)
        if rss_mb(proxy.proc.pid) is None:
            results.note("RSS, threads and CPU skipped: no /proc on this system")
        results.add("RSS MB, idle after first requests", "proxy", rss_mb(proxy.proc.pid))
        asyncio.run(check_shapes(results, ports))
        asyncio.run(measure_load(results, ports, pids, duration))
        time.sleep(0.2)
        results.add("RSS MB, idle after load", "proxy", rss_mb(proxy.proc.pid))
        results.add("RSS MB, idle after load", "relay", rss_mb(pids["relay"]))
        asyncio.run(measure_held_streams(results, ports, pids))
        if proxy.proc.poll() is not None:
            raise BenchError(f"proxypal.py exited with code {proxy.proc.returncode} during the run")
    finally:
        stop_child(proxy.proc)


# =============================================================================
# Report
# =============================================================================

def number(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(runs: Optional[List[float]]) -> str:
    if not runs:
        return "-"
    return "/".join(number(v) for v in (min(runs), statistics.median(runs), max(runs)))


def ratio(results: Results, metric: str, path: str) -> str:
    mine, direct = results.median(metric, path), results.median(metric, "direct")
    if mine is None or not direct:
        return "-"
    return f"{mine / direct:.2f}x"


def print_table(results: Results, runs: int) -> None:
    print(f"\neach cell: min/median/max over {runs} run(s); ratios compare medians\n")
    row = "{:<38} {:>20} {:>20} {:>20} {:>12} {:>12}"
    print(row.format("metric", "direct", "relay", "proxy", "relay/direct", "proxy/direct"))
    print("-" * 127)
    for metric, by_path in results.values.items():
        print(row.format(metric, *(cell(by_path.get(p)) for p in PATHS),
                         ratio(results, metric, "relay"), ratio(results, metric, "proxy")))
    print("\nCPU us: CPU time of the relay or proxy process (all threads) per request or "
          "event. added p50: p50 minus direct's p50, same run.\nopen fds after the streams "
          "closed: a server that let go of them is back at its idle count (about 7).")


def print_pairs(results: Results) -> None:
    print(f"\nstreams by client API -> upstream API (c=1 first event, c={STREAM_CONCURRENCY} "
          "events/s; direct where the two APIs match)\n")
    row = "{:<36} {:<28} {:>20} {:>20} {:>12} {:>15}"
    print(row.format("client -> upstream", "metric", "direct", "proxy", "proxy/direct",
                     "vs pass-through"))
    print("-" * 136)
    for pair in PAIRS:
        name = f"{pair.label}, {'translated' if pair.translated else 'pass-through'}"
        for metric, by_path in results.pairs.get(pair.label, {}).items():
            mine = results.pair_median(pair, metric, "proxy")
            direct = results.pair_median(pair, metric, "direct")
            base = results.pair_median(StreamPair(pair.client, pair.client), metric, "proxy")
            print(row.format(name, metric, cell(by_path.get("direct")), cell(by_path.get("proxy")),
                             f"{mine / direct:.2f}x" if mine is not None and direct else "-",
                             f"{mine / base:.2f}x" if pair.translated and mine is not None
                             and base else "-"))
            name = ""
    print(f"\nclient events: SSE events the client read. upstream events/s: {UPSTREAM_EVENTS} "
          "events each stream the mock sent, over the time taken; for a translated stream the\n"
          "fair comparison with pass-through. vs pass-through: proxy median over the proxy "
          "median of the pass-through pair of the same client API.")


class Target(NamedTuple):
    label: str
    metric: str                        # the row of the results table it judges
    value: Optional[float]             # proxy median, or proxy as % of direct
    limit: str
    ok: Callable[[float], bool]


def targets(results: Results) -> List[Target]:
    def proxy(metric: str) -> Optional[float]:
        return results.median(metric, "proxy")

    def share(metric: str) -> Optional[float]:
        mine, direct = proxy(metric), results.median(metric, "direct")
        return None if mine is None or not direct else mine / direct * 100

    added, first = "added p50 ms c=1, non-stream", "added p50 ms c=1, first event"
    rps, events = "non-stream req/s c=16", f"stream events/s c={STREAM_CONCURRENCY}"
    cold, idle = "proxy cold start ms", "RSS MB, idle after first requests"
    held = f"RSS MB, {HELD_STREAMS} open streams"
    return [
        Target("added p50 latency c=1, non-stream (ms)", added, proxy(added), "<= 0.5",
               lambda v: v <= 0.5),
        Target("added p50 latency c=1, first event (ms)", first, proxy(first), "<= 0.5",
               lambda v: v <= 0.5),
        Target("non-stream req/s c=16, % of direct", rps, share(rps), ">= 20",
               lambda v: v >= 20),
        Target(f"stream events/s c={STREAM_CONCURRENCY}, % of direct", events, share(events),
               ">= 40", lambda v: v >= 40),
        Target("cold start (ms)", cold, proxy(cold), "< 300", lambda v: v < 300),
        Target("RSS idle (MB)", idle, proxy(idle), "< 30", lambda v: v < 30),
        Target(f"RSS with {HELD_STREAMS} open streams (MB)", held, proxy(held), "< 60",
               lambda v: v < 60),
    ] + [Target(f"{pair.label} upstream events/s c={STREAM_CONCURRENCY}, % of pass-through",
                f"{pair.label}: {UPSTREAM_RATE}",
                pass_through_share(results, pair), ">= 50", lambda v: v >= 50)
         for pair in PAIRS if pair.translated]


def pass_through_share(results: Results, pair: StreamPair) -> Optional[float]:
    """A translated pair's proxy upstream events/s, as % of its client's pass-through."""
    mine = results.pair_median(pair, UPSTREAM_RATE, "proxy")
    base = results.pair_median(StreamPair(pair.client, pair.client), UPSTREAM_RATE, "proxy")
    return None if mine is None or not base else mine / base * 100


def print_targets(results: Results) -> int:
    """The targets table; returns how many were missed."""
    print("\ntargets (proxy, medians over the runs)\n")
    row = "{:<58} {:>10} {:>8}  {}"
    print(row.format("target", "value", "limit", "result"))
    print("-" * 88)
    missed = 0
    for target in targets(results):
        if target.metric in results.failed:
            verdict = "FAIL (the proxy failed it, see below)"
        elif target.value is None:
            verdict = "SKIP (not measured here)"
        else:
            verdict = "PASS" if target.ok(target.value) else "FAIL"
        missed += verdict.startswith("FAIL")
        print(row.format(target.label, number(target.value), target.limit, verdict))
    print("\npass-through: the pair of the same client API (anthropic -> anthropic, "
          "openai -> openai), measured in the same runs")
    return missed


def print_errors(results: Results, log_paths: List[str]) -> None:
    for text in results.notes:
        print(f"\nnote: {text}")
    if results.errors:
        print("\nfailed requests (path, phase: count, first few distinct errors):")
        for where, errors in results.errors.items():
            distinct = list(dict.fromkeys(errors))[:3]
            print(f"  {where}: {len(errors)}")
            for error in distinct:
                print(f"    {error[:300]}")
    lines: List[str] = []
    for path in log_paths:
        try:
            with open(path, errors="replace") as f:
                lines += [line.rstrip() for line in f if line.strip() and " INFO " not in line]
        except OSError:
            pass
    if lines:
        print(f"\nproxypal.py logged {len(lines)} non-INFO line(s) on stderr; the first few:")
        for line in list(dict.fromkeys(lines))[:10]:
            print(f"  {line[:300]}")


# =============================================================================
# Main
# =============================================================================

def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark proxypal.py against a direct connection and a bare relay "
                    "to a mock upstream. Targets: " + TARGETS_TEXT)
    parser.add_argument("--runs", type=int, default=3, help="measurement runs (default 3)")
    parser.add_argument("--duration", type=float, default=None,
                        help=f"seconds per load point (default {DURATION:g}; "
                             f"{QUICK_DURATION:g} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="one short run: a smoke test of the bench itself")
    parser.add_argument("--serve", choices=("mock", "relay"), help=argparse.SUPPRESS)
    parser.add_argument("--upstream-port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.runs = 1
    if args.duration is None:
        args.duration = QUICK_DURATION if args.quick else DURATION
    if args.runs < 1 or args.duration <= 0:
        parser.error("--runs must be at least 1 and --duration positive")
    return args


def interrupt_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM is handled as Ctrl-C: the run unwinds and the finally blocks stop every child."""
    os.kill(os.getpid(), signal.SIGINT)


def bench(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)
    raise_fd_limit(4 * HELD_STREAMS + 256)
    results = Results()
    children: List[subprocess.Popen] = []
    log_paths: List[str] = []
    with tempfile.TemporaryDirectory(prefix="proxypal-bench-") as tmp:
        try:
            mock, mock_port = start_server_child("mock")
            children.append(mock)
            relay, relay_port = start_server_child("relay", mock_port)
            children.append(relay)
            config_path = write_proxy_config(tmp, mock_port)
            ports = {"direct": mock_port, "relay": relay_port}
            pids = {"relay": relay.pid}
            started = time.monotonic()
            for run in range(args.runs):
                progress(f"run {run + 1}/{args.runs}")
                log_paths.append(os.path.join(tmp, f"proxypal-{run + 1}.log"))
                one_run(results, config_path, log_paths[-1], ports, pids, args.duration)
            elapsed = time.monotonic() - started
        finally:
            for child in reversed(children):
                stop_child(child)
        print(f"proxypal bench: {args.runs} run(s) in {elapsed:.0f}s, {args.duration:g}s per "
              f"load point, {STREAM_EVENTS}-event streams; Python {sys.version.split()[0]}, "
              f"{os.cpu_count()} CPU(s); load client, mock, relay and proxy share them")
        print_table(results, args.runs)
        print_pairs(results)
        failed = print_targets(results)
        print_errors(results, log_paths)
    print(f"\n{failed} target(s) missed" if failed else "\nall targets met")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve_child(args.serve, args.upstream_port)
    try:
        return bench(args)
    except BenchError as exc:
        print(f"bench broke: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
