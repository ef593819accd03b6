#!/usr/bin/env python3
"""tests/bench.py: what proxypal.py costs over talking to the upstream directly.

Every row is measured on three paths to the same mock upstream, side by side in one run:
    direct   the load client talks to the mock itself
    relay    a bare asyncio byte relay (accept, connect, copy bytes both ways; about 30
             lines, below): the floor a Python proxy can reach
    proxy    proxypal.py, started as a subprocess the way a user starts it

The rows, and the target each is judged on (the proxy's median over the runs):

  row                           what                                              target
  pass-through stream, burst    the mock writes a whole 200-event stream at      <= 1.5 us
                                once; CPU us per event, openai -> openai and
                                anthropic -> anthropic
  pass-through stream, paced    one event every 5 ms, so each is its own read    <= 1.3 x relay
                                (a real model's pace); CPU us per event, both
  translated stream, burst      Anthropic client, OpenAI upstream: CPU us per    <= 4 us
                                upstream event (the reverse pair: reported)
  non-stream                    c=1, 16 and 64 connections: requests/s, p50 and  <= 45 us
                                p99 latency, CPU us per request                  at c=16
  added time to first event     c=1, proxy p50 minus direct p50; the mock sends  <= +0.25 ms
                                the first event alone and the rest 5 ms later,
                                as a model does (reported too: the whole stream
                                in one burst, where the first event also waits
                                while the proxy handles the rest of that read)
  idle RSS                      `python proxypal.py` after its first requests    <= 27 MB
  RSS with 500 open streams                                                      <= 45 MB
  cold start                    spawn to the first answered GET /health          reported
  --workers N                   non-stream requests/s at c=16, the proxy         reported
                                started with --workers 1, 2, 4 (SO_REUSEPORT)

Streams run 32 at a time. Every cell shows min/median/max over --runs runs; ratios and
verdicts use the medians. A translated stream has no direct or relay of its own: those
columns show the upstream's own stream, untranslated (the pass-through burst row of the
upstream's format).

CPU is the CPU time of the proxy process alone (all its threads), and of the relay process
alone, read before and after each measured phase: the sum of /proc/PID/task/*/schedstat
(nanoseconds); or, when that and utime+stime from /proc/PID/stat disagree because a
thread ended meanwhile, utime+stime (it keeps ended threads' time, in 10 ms ticks).
Without /proc, CPU and RSS are skipped with a note. The load client and the mock are
not counted.

Once a run, one non-stream and one streamed answer of each client/upstream pair
(openai -> openai, anthropic -> anthropic, anthropic -> openai, openai -> anthropic) are
parsed whole and checked: event order, text, stop reason, model. The mock serves both
APIs: the bench's config has an ampOpenaiProviders entry for model "m" and a
claudeApiKeys entry for "claude-m", both pointing at it.

Run it:
    make bench                                  # 3 runs, about 4 minutes
    python3 tests/bench.py --quick              # one short run: a smoke test of the bench
    python3 tests/bench.py --runs 5 --duration 3
    python3 tests/bench.py --baseline HEAD~1    # also the proxypal.py of HEAD~1, same run
    python3 tests/bench.py --baseline /path/to/other/proxypal.py
    PROXYPAL_BENCH_PROXY=/tmp/p/proxypal.py python3 tests/bench.py   # or --proxy PATH

--baseline REV starts a second proxy, `git show REV:proxypal.py` from this repository
(or the file at that path), against the same mock, and measures every stream row on it
right after the current proxy: events/s and CPU us per event, current vs baseline.

The mock and the relay run in child processes of this script (`--serve mock|relay`), so
the load client, the mock, the relay and the proxy each have their own event loop; on a
2-core machine they share the CPUs, as on a laptop. The report's header says what else
ran meanwhile (other processes' CPU, the hypervisor's steal): on a shared machine, read
the figures with it; CPU per unit is steadier than requests/s or latency. Standard library only; loopback
only. The bench reports, it does not assert: it exits 0 even when a target is missed,
non-zero only when it broke.
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
REPO = os.path.dirname(HERE)
PROXY_ENV = "PROXYPAL_BENCH_PROXY"    # the proxypal.py to measure (default: the repo's)

HOST = "127.0.0.1"                 # loopback only, everywhere
LOCAL_KEY = "proxypal-local"       # the proxy's default local key
MODEL = "m"                        # served by the ampOpenaiProviders entry
CLAUDE_MODEL = "claude-m"          # served by the claudeApiKeys entry (same mock)
ANTHROPIC_VERSION = "2023-06-01"
UPSTREAM_EVENTS = 200              # SSE events in one mock stream, in either format
OPENAI_CHUNKS = UPSTREAM_EVENTS - 1      # chat.completion.chunk events, then data: [DONE]
ANTHROPIC_DELTAS = UPSTREAM_EVENTS - 5   # text deltas; the other five are message_start,
                                         # content_block_start/stop, message_delta, message_stop
PACE_MS = 5                        # gap between a paced stream's events: about a real model's
                                   # pace, and long enough that every event is its own read
STREAM_CONCURRENCY = 32            # streams at once: a paced phase then carries ~6,000
                                   # events/s, enough CPU time to measure well
CONCURRENCIES = (1, 16, 64)        # non-stream load points
JUDGED_CONCURRENCY = 16            # the one the CPU-per-request target and --workers use
WORKER_COUNTS = (1, 2, 4)          # --workers N; the bench machine has 2 cores
HELD_STREAMS = 500                 # streams held open at once for the RSS measurement
HOLD_WAVE = 50                     # held streams opened at a time: listen backlogs are finite
DURATION = 2.0                     # seconds per load point (a paced stream takes ~1 s)
QUICK_DURATION = 0.5
TIMEOUT = 10.0                     # a connect, a request, a startup: nothing waits longer
IDLE_TIMEOUT = 60.0                # the mock and the relay close connections silent this long
READ_SIZE = 64 * 1024
PATHS = ("direct", "relay", "proxy")
SERVERS = ("relay", "proxy")       # the paths with a process in the middle (CPU, RSS)

# Targets, judged on the proxy's medians.
BURST_CPU_US = 1.5                 # pass-through burst stream, CPU us per event
PACED_VS_RELAY = 1.3               # pass-through paced stream, CPU per event over the relay's
TRANSLATED_CPU_US = 4.0            # anthropic client -> openai upstream, CPU us per event
REQUEST_CPU_US = 45.0              # non-stream at JUDGED_CONCURRENCY, CPU us per request
ADDED_FIRST_EVENT_MS = 0.25        # c=1, proxy p50 minus direct p50
IDLE_RSS_MB = 27.0
HELD_RSS_MB = 45.0


class BenchError(Exception):
    """The bench itself broke (not: a target was missed)."""


# =============================================================================
# Mock upstream (child process), two APIs:
#   POST /v1/chat/completions   OpenAI format
#   POST /v1/messages           Anthropic format (a claudeApiKeys baseUrl without /v1)
# A body with "stream": true gets an SSE stream of UPSTREAM_EVENTS events (OpenAI:
# OPENAI_CHUNKS chunk events and [DONE]; Anthropic: message_start, content_block_start,
# ANTHROPIC_DELTAS text deltas, content_block_stop, message_delta with usage,
# message_stop), each event its own HTTP chunk. By default the whole stream goes out
# in one write (burst). With "bench_pace_ms": N the events go out one by one, N ms
# apart; with "bench_paced_events": K as well, only the first K are followed by the
# pause, and the rest go out together after it. With "bench_hold": true the stream stops after its first event and the
# connection stays open until the other side closes it. A request either API would
# refuse (no messages; Anthropic: no max_tokens or anthropic-version) gets a 400, so a
# translation that drops them shows up as failed requests.
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
LAST_CHUNK = b"0\r\n\r\n"


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def openai_events() -> List[bytes]:
    """One HTTP chunk per SSE event: OPENAI_CHUNKS chunks (the last one only finishes),
    then [DONE]."""
    chunks = []
    for i in range(OPENAI_CHUNKS):
        last = i == OPENAI_CHUNKS - 1
        event = {"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                 "created": 1700000000, "model": MODEL,
                 "choices": [{"index": 0, "delta": {} if last else {"content": f"tok{i} "},
                              "finish_reason": "stop" if last else None}]}
        chunks.append(http_chunk(b"data: " + json.dumps(event).encode() + b"\n\n"))
    chunks.append(http_chunk(b"data: [DONE]\n\n"))
    return chunks


def anthropic_events() -> List[bytes]:
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
    return [http_chunk(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode()) for e in events]


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


class Route(NamedTuple):
    api: str
    answer: bytes                      # the whole non-stream response
    events: List[bytes]                # a stream's events, one HTTP chunk each

    @property
    def burst(self) -> bytes:
        return SSE_HEAD + b"".join(self.events) + LAST_CHUNK


NOT_FOUND = (b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\n"
             b"not found")
MOCK_ROUTES = {                        # request line start -> route
    b"POST /v1/chat/completions ": Route("openai", completion_response(), openai_events()),
    b"POST /v1/messages ": Route("anthropic", message_response(), anthropic_events()),
}
BURSTS = {route.api: route.burst for route in MOCK_ROUTES.values()}   # built once


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
            problem = mock_problem(route.api, head, request) if route else ""
            pace = request.get("bench_pace_ms")
            if route is None:
                writer.write(NOT_FOUND)
            elif problem:
                writer.write(refusal(route.api, problem))
            elif request.get("stream") is not True:
                writer.write(route.answer)
            elif request.get("bench_hold") is True:
                await mock_held_stream(reader, writer, route)
                return
            elif isinstance(pace, (int, float)) and pace > 0:
                paced = request.get("bench_paced_events", UPSTREAM_EVENTS)
                for i, data in enumerate(paced_writes(route, paced)):
                    if i:
                        await asyncio.sleep(pace / 1000)
                    writer.write(data)
                    await writer.drain()
            else:
                writer.write(BURSTS[route.api])
            await writer.drain()
            idle.touch()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    except asyncio.CancelledError:
        pass                               # the child is stopping; nothing to clean up
    finally:
        idle.close()


def paced_writes(route: Route, paced: int) -> List[bytes]:
    """A stream cut into the writes of a paced answer: the head with the first event, the
    next events one a write up to the `paced`-th, then the rest with the end of the body."""
    events = route.events
    paced = max(1, min(paced, len(events) - 1))
    return [SSE_HEAD + events[0], *events[1:paced], b"".join(events[paced:]) + LAST_CHUNK]


async def mock_held_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           route: Route) -> None:
    """The head and the first event, then nothing until the other side closes."""
    writer.write(SSE_HEAD + route.events[0])
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


def start_proxy(proxy_file: str, config_path: str, log_path: str, workers: int = 0) -> Proxy:
    """Spawn a proxypal.py on an ephemeral port; time spawn to the first /health 200.
    With workers, start it with --workers N and wait until all N listen."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYPAL_")}
    argv = [sys.executable, proxy_file, "--config", config_path, "--port", "0"]
    if workers:
        argv += ["--workers", str(workers)]
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
        cold_start = time.perf_counter() - t0
        if workers > 1:
            wait_for_listeners(port, workers, time.perf_counter() + TIMEOUT)
        return Proxy(proc, port, cold_start)
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


def listeners(port: int) -> Optional[int]:
    """Listening IPv4 sockets on a port (one per SO_REUSEPORT worker); None without /proc."""
    try:
        with open("/proc/net/tcp") as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return None
    suffix = f":{port:04X}"
    return sum(1 for row in rows if row[1].endswith(suffix) and row[3] == "0A")


def wait_for_listeners(port: int, count: int, deadline: float) -> None:
    """Until `count` processes listen on the port: the kernel spreads new connections
    over the listening sockets there are when they connect, so a load started earlier
    would land on the first worker only. Without /proc: a second's grace."""
    while True:
        found = listeners(port)
        if found is None:
            time.sleep(1.0)
            return
        if found >= count:
            return
        if time.perf_counter() > deadline:
            raise BenchError(f"only {found} of {count} workers listen after {TIMEOUT:g}s")
        time.sleep(0.01)


def proc_status(pid: int, field: str) -> Optional[int]:
    """A number from /proc/<pid>/status (VmRSS in kB); None without /proc."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb(pid: Optional[int]) -> Optional[float]:
    kb = proc_status(pid, "VmRSS") if pid else None
    return None if kb is None else kb / 1024


TICK = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


class CpuMark(NamedTuple):
    """A process's CPU time so far, two ways."""
    threads: Optional[float]   # seconds, summed over its live threads' schedstat: exact
    process: float             # seconds, utime+stime: ended threads too, but in TICKs


def cpu_mark(pid: Optional[int]) -> Optional[CpuMark]:
    """None without /proc (or without a process: the direct path)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    process = (int(fields[11]) + int(fields[12])) * TICK
    threads: Optional[float] = 0.0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                threads += int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        threads = None             # no schedstat, or a thread ended while we read
    return CpuMark(threads, process)


def cpu_between(before: Optional[CpuMark], after: Optional[CpuMark]) -> Optional[float]:
    """CPU seconds spent between two marks: schedstat's exact sum, unless utime+stime
    disagree by more than their rounding (a thread ended meanwhile and took its schedstat
    with it), then utime+stime."""
    if before is None or after is None:
        return None
    coarse = after.process - before.process
    if before.threads is None or after.threads is None:
        return coarse
    fine = after.threads - before.threads
    return fine if abs(coarse - fine) <= 3 * TICK else coarse


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


def baseline_file(spec: str, directory: str) -> Tuple[str, str]:
    """The baseline proxypal.py and a label for it: a file at that path, else the
    repository's proxypal.py at git revision `spec`, written into `directory`."""
    if os.path.isfile(spec):
        return os.path.abspath(spec), spec

    def git(*args: str) -> bytes:
        try:
            return subprocess.run(["git", "-C", REPO, *args], capture_output=True,
                                  check=True, timeout=TIMEOUT).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            raise BenchError(f"--baseline {spec}: not a file, and git {' '.join(args)} "
                             f"failed: {exc} {detail.decode(errors='replace').strip()}") from None

    source = git("show", f"{spec}:proxypal.py")
    commit = git("rev-parse", "--short", f"{spec}^{{commit}}").decode().strip()
    folder = os.path.join(directory, "baseline")
    os.makedirs(folder)
    path = os.path.join(folder, "proxypal.py")
    with open(path, "wb") as f:
        f.write(source)
    return path, f"{spec} ({commit})"


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
    looks like: for a stream, the least and most SSE events, and the least time it takes."""
    api: str                           # "openai" (/v1/chat/completions) or "anthropic"
    payload: Dict[str, object]
    min_events: int = UPSTREAM_EVENTS
    max_events: int = UPSTREAM_EVENTS
    min_seconds: float = 0.0

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
        if api == "openai":                # the usage chunk comes only when asked for
            payload["stream_options"] = {"include_usage": True}
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
        self.tail = (self.tail + data[-512:])[-512:]
        self.error = self.error or b'"error"' in data

    def last_event(self) -> bytes:
        return self.tail.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]


def stream_problem(call: Call, body: Body, seconds: float) -> str:
    """Why a streamed answer is not what the client's API promises ("" if it is): the
    event count in range, no error event, the right first and last event, and (paced)
    not faster than the mock sends it."""
    if call.api == "anthropic":
        shape = "message_start ... message_stop"
        good = (body.start.startswith(b"event: message_start\n")
                and body.last_event().startswith(b"event: message_stop\n"))
    else:
        shape = "chunks ... [DONE]"
        good = body.last_event() == b"data: [DONE]"
    if seconds < call.min_seconds:
        return (f"stream over in {seconds * 1000:.0f} ms; a paced one takes at least "
                f"{call.min_seconds * 1000:.0f} ms (was bench_pace_ms dropped on the way?)")
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
            await self.read_chunked(sink)
        elif "content-length" in headers:
            sink(await self.reader.readexactly(int(headers["content-length"])))
        else:
            sink(await self.reader.read())            # delimited by the close
            self.close()
            return
        if "close" in headers.get("connection", "").lower():
            self.close()

    async def read_chunked(self, sink: Callable[[bytes], None]) -> None:
        """A chunked body, parsed out of large reads: the data of all the chunks one read
        completes goes to sink at once, so the client spends little per event and leaves
        the CPUs to what is measured."""
        buf, pos, parts = b"", 0, []
        while True:
            end = buf.find(b"\r\n", pos)
            if end >= 0:
                try:
                    size = int(buf[pos:end].split(b";")[0], 16)
                except ValueError:
                    raise BadResponse(f"malformed chunk size line {buf[pos:end][:40]!r}") from None
                if size == 0:                     # the last chunk; trailers, then CRLF
                    finish = buf.find(b"\r\n\r\n", end)
                    if finish >= 0:
                        if finish + 4 != len(buf):
                            raise BadResponse("bytes after the last chunk")
                        if parts:
                            sink(b"".join(parts))
                        return
                else:
                    stop = end + 2 + size
                    if len(buf) >= stop + 2:
                        if buf[stop:stop + 2] != b"\r\n":
                            raise BadResponse("chunk data not followed by CRLF")
                        parts.append(buf[end + 2:stop])
                        pos = stop + 2
                        continue
            if parts:
                sink(b"".join(parts))
                parts = []
            more = await self.reader.read(READ_SIZE)
            if not more:
                raise asyncio.IncompleteReadError(buf[pos:], None)
            buf, pos = buf[pos:] + more, 0

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
            problem = stream_problem(self.call, body, latency)
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
        seen = b""
        while b"\n\n" not in seen:
            more = await self.reader.read(READ_SIZE)
            if not more:
                raise BadResponse("held stream ended before its first event")
            seen += more


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
                   watch_pid: Optional[int], warm: Optional[Call] = None) -> Phase:
    """`concurrency` connections sending requests back to back for `duration` seconds,
    after one warm-up request each (`warm`, default `call`: it opens the connections
    and the proxy's upstream pool). CPU of watch_pid over the measured part."""
    warm_clients = [Client(port, warm or call) for _ in range(concurrency)]
    clients = warm_clients
    try:
        warm_errors: List[str] = []
        await bounded(TIMEOUT, "warm-up", *(worker(c, 0.0, [], warm_errors) for c in clients))
        if warm is not None:           # the same open connections, the measured request
            clients = [Client(port, call) for _ in warm_clients]
            for client, opened in zip(clients, warm_clients):
                client.reader, client.writer = opened.reader, opened.writer
        samples: List[Sample] = []
        errors = [f"warm-up: {e}" for e in warm_errors]
        before = cpu_mark(watch_pid)
        t0 = time.perf_counter()
        await bounded(duration + 2 * TIMEOUT, "load",
                      *(worker(c, t0 + duration, samples, errors) for c in clients))
        elapsed = time.perf_counter() - t0
        cpu = cpu_between(before, cpu_mark(watch_pid))
    finally:
        close_all(clients)
    if not samples:
        raise BenchError(f"no request succeeded on port {port}: {errors[:3]}")
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
# Streams: the API the client speaks, the API the model's upstream speaks, the pace.
# =============================================================================

def text_deltas(upstream: str) -> int:
    """Events carrying text in one mock stream (the last OpenAI chunk only finishes)."""
    return OPENAI_CHUNKS - 1 if upstream == "openai" else ANTHROPIC_DELTAS


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


OPENAI, ANTHROPIC = StreamPair("openai", "openai"), StreamPair("anthropic", "anthropic")
PAIRS = (OPENAI, ANTHROPIC, StreamPair("anthropic", "openai"), StreamPair("openai", "anthropic"))


class StreamRow(NamedTuple):
    """A stream the table has a row for: a pair, sent by the mock in a burst or paced."""
    pair: StreamPair
    paced: bool = False

    @property
    def name(self) -> str:
        return f"{'paced' if self.paced else 'burst'} {self.pair.label}"

    @property
    def per(self) -> str:
        return "upstream event" if self.pair.translated else "event"

    @property
    def rate_key(self) -> str:
        return f"{self.name}: {self.per}s/s"

    @property
    def cpu_key(self) -> str:
        return f"{self.name}: CPU us/{self.per}"

    @property
    def paths(self) -> Tuple[str, ...]:
        return ("proxy",) if self.pair.translated else PATHS

    @property
    def untranslated(self) -> "StreamRow":
        """The row of the upstream's own stream: a translated row's direct and relay."""
        return StreamRow(StreamPair(self.pair.upstream, self.pair.upstream), self.paced)

    def call(self) -> Call:
        return paced(self.pair.call()) if self.paced else self.pair.call()


def paced(call: Call, events: int = UPSTREAM_EVENTS) -> Call:
    """The call, asking the mock to pause PACE_MS after each of the first `events` events
    (all of them by default); a stream over sooner than that took a shortcut."""
    pauses = min(events, UPSTREAM_EVENTS - 1)
    return call._replace(payload=dict(call.payload, bench_pace_ms=PACE_MS,
                                      bench_paced_events=events),
                         min_seconds=0.9 * pauses * PACE_MS / 1000)


STREAM_ROWS = (StreamRow(OPENAI), StreamRow(ANTHROPIC),
               StreamRow(OPENAI, paced=True), StreamRow(ANTHROPIC, paced=True),
               StreamRow(PAIRS[2]), StreamRow(PAIRS[3]))
FIRST_EVENT_CALLS = {                 # how the mock sends the stream -> the request
    "sent alone": paced(OPENAI.call(), 1),    # the first event, a pause, the rest
    "burst": OPENAI.call(),
}
JUDGED_FIRST_EVENT = next(iter(FIRST_EVENT_CALLS))


# =============================================================================
# One run: every measurement once, against freshly started proxies.
# =============================================================================

def percentile(values: List[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


class Results:
    """row key -> path -> one value per run."""

    def __init__(self) -> None:
        self.values: Dict[str, Dict[str, List[float]]] = {}
        self.errors: Dict[str, List[str]] = {}
        self.failed: Set[str] = set()     # rows the proxy failed before they could be measured
        self.notes: List[str] = []

    def add(self, key: str, path: str, value: Optional[float]) -> None:
        if value is not None:
            self.values.setdefault(key, {}).setdefault(path, []).append(value)

    def runs(self, key: str, path: str) -> List[float]:
        return self.values.get(key, {}).get(path, [])

    def median(self, key: str, path: str) -> Optional[float]:
        runs = self.runs(key, path)
        return statistics.median(runs) if runs else None

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def record_errors(self, phase: str, path: str, errors: List[str]) -> None:
        if errors:
            self.errors.setdefault(f"{path}, {phase}", []).extend(errors)


class Endpoint(NamedTuple):
    port: int
    pid: Optional[int]                 # the process whose CPU and RSS are read (direct: none)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def non_stream_key(concurrency: int, metric: str) -> str:
    return f"non-stream c={concurrency}: {metric}"


def workers_key(count: int) -> str:
    return f"--workers {count}: requests/s c={JUDGED_CONCURRENCY}"


def first_event_key(mode: str, metric: str) -> str:
    return f"first event c=1, {mode}: {metric}"


ADDED_FIRST_EVENT = first_event_key(JUDGED_FIRST_EVENT, "added ms")
IDLE_RSS = "RSS MB, idle after the first requests"
HELD_RSS = f"RSS MB, {HELD_STREAMS} open streams"
COLD_START = "cold start ms (spawn to GET /health)"
SINGLE_PROCESS = non_stream_key(JUDGED_CONCURRENCY, "requests/s")


async def measure(results: Results, endpoints: Dict[str, Endpoint], path: str, call: Call,
                  concurrency: int, duration: float, phase: str, keys: Tuple[str, ...],
                  warm: Optional[Call] = None) -> Optional[Phase]:
    """One load phase on one path. Direct or the relay failing it means the bench broke;
    a proxy (or the baseline) failing it is recorded, its rows marked, and the run goes on."""
    endpoint = endpoints[path]
    try:
        result = await run_load(endpoint.port, call, concurrency, duration, endpoint.pid, warm)
    except BenchError as exc:
        if path in ("direct", "relay"):
            raise
        results.record_errors(phase, path, [str(exc)])
        if path == "proxy":
            results.failed.update(keys)
        return None
    results.record_errors(phase, path, result.errors)
    return result


def per_unit_us(phase: Phase, units: int) -> Optional[float]:
    return None if phase.cpu is None else phase.cpu / units * 1e6


async def measure_non_stream(results: Results, endpoints: Dict[str, Endpoint],
                             duration: float) -> None:
    for c in CONCURRENCIES:
        progress(f"  non-stream c={c}")
        keys = tuple(non_stream_key(c, m) for m in
                     ("requests/s", "p50 ms", "p99 ms", "CPU us/request"))
        for path in PATHS:
            phase = await measure(results, endpoints, path, CHAT, c, duration,
                                  f"non-stream c={c}", keys)
            if phase is None:
                continue
            latencies = [s.latency * 1000 for s in phase.samples]
            values = (len(phase.samples) / phase.elapsed, percentile(latencies, 0.50),
                      percentile(latencies, 0.99), per_unit_us(phase, len(phase.samples)))
            for key, value in zip(keys, values):
                results.add(key, path, value)


async def measure_first_event(results: Results, endpoints: Dict[str, Endpoint],
                              duration: float) -> None:
    """p50 time to the first event at c=1 (openai -> openai), for each way the mock sends
    the stream; the relay's and the proxy's minus direct's."""
    for mode, call in FIRST_EVENT_CALLS.items():
        progress(f"  first event c=1, {mode}")
        keys = (first_event_key(mode, "p50 ms"), first_event_key(mode, "added ms"))
        p50: Dict[str, float] = {}
        for path in PATHS:
            phase = await measure(results, endpoints, path, call, 1, duration,
                                  f"first event c=1, {mode}", keys, warm=OPENAI.call())
            firsts = [s.first_event * 1000 for s in phase.samples
                      if s.first_event is not None] if phase else []
            if firsts:
                p50[path] = percentile(firsts, 0.50)
                results.add(keys[0], path, p50[path])
        for path in SERVERS:
            if path in p50 and "direct" in p50:
                results.add(keys[1], path, p50[path] - p50["direct"])


async def measure_stream_row(results: Results, endpoints: Dict[str, Endpoint], row: StreamRow,
                             duration: float) -> None:
    """Upstream events/s and CPU per upstream event at STREAM_CONCURRENCY, on the row's
    paths and, when there is one, the baseline (right after the proxy, so the two see
    the same machine)."""
    progress(f"  stream {row.name} c={STREAM_CONCURRENCY}")
    paths = row.paths + (("baseline",) if "baseline" in endpoints else ())
    for path in paths:
        phase = await measure(results, endpoints, path, row.call(), STREAM_CONCURRENCY, duration,
                              f"stream {row.name} c={STREAM_CONCURRENCY}",
                              (row.rate_key, row.cpu_key), warm=row.pair.call())
        if phase is None:
            continue
        events = len(phase.samples) * UPSTREAM_EVENTS
        results.add(row.rate_key, path, events / phase.elapsed)
        results.add(row.cpu_key, path, per_unit_us(phase, events))


async def measure_held_streams(results: Results, endpoints: Dict[str, Endpoint]) -> None:
    for path in SERVERS:
        progress(f"  {HELD_STREAMS} held streams via {path}")
        try:
            clients = await hold_streams(endpoints[path].port, HELD_STREAMS)
        except BenchError as exc:
            if path != "proxy":
                raise
            results.failed.add(HELD_RSS)
            results.record_errors(f"{HELD_STREAMS} held streams", path, [str(exc)])
            continue
        try:
            await asyncio.sleep(0.2)               # let the last reads settle
            results.add(HELD_RSS, path, rss_mb(endpoints[path].pid))
        finally:
            close_all(clients)
        await asyncio.sleep(0.5)                   # the servers notice the closes


async def warm_up(endpoint: Endpoint, what: str) -> None:
    """One non-stream and one streamed request, so "idle" means imported and used."""
    for call in (CHAT, STREAMED_CHAT):
        client = Client(endpoint.port, call)
        try:
            await bounded(TIMEOUT, f"first {what} request", client.exchange())
        except CLIENT_ERRORS as exc:
            raise BenchError(f"the {what} failed its first request: {type(exc).__name__}: "
                             f"{exc}") from None
        finally:
            client.close()


async def measure_run(results: Results, endpoints: Dict[str, Endpoint], duration: float) -> None:
    """Everything but cold start and --workers, against the proxies of this run."""
    for path in SERVERS:
        await warm_up(endpoints[path], path)
    if "baseline" in endpoints:
        try:
            await warm_up(endpoints["baseline"], "baseline")
        except BenchError as exc:                  # not this bench's proxy: carry on without
            results.record_errors("first request", "baseline", [str(exc)])
            del endpoints["baseline"]
    await asyncio.sleep(0.2)
    for path in SERVERS:
        results.add(IDLE_RSS, path, rss_mb(endpoints[path].pid))
    await check_shapes(results, endpoints)
    await measure_non_stream(results, endpoints, duration)
    await measure_first_event(results, endpoints, duration)
    for row in STREAM_ROWS:
        await measure_stream_row(results, endpoints, row, duration)
    await measure_held_streams(results, endpoints)


class Setup(NamedTuple):
    tmp: str
    config_path: str
    proxy_file: str
    baseline_file: Optional[str]
    duration: float


def one_run(results: Results, setup: Setup, endpoints: Dict[str, Endpoint], run: int) -> None:
    progress("  proxy cold start")
    proxies: List[Proxy] = []
    try:
        proxy = start_proxy(setup.proxy_file, setup.config_path, log_path(setup, f"proxy-{run}"))
        proxies.append(proxy)
        results.add(COLD_START, "proxy", proxy.cold_start * 1000)
        endpoints = dict(endpoints, proxy=Endpoint(proxy.port, proxy.proc.pid))
        if setup.baseline_file:
            try:
                baseline = start_proxy(setup.baseline_file, setup.config_path,
                                       log_path(setup, f"baseline-{run}"))
            except BenchError as exc:              # not this bench's proxy: carry on without
                results.record_errors("start", "baseline", [str(exc)])
            else:
                proxies.append(baseline)
                endpoints["baseline"] = Endpoint(baseline.port, baseline.proc.pid)
        if cpu_mark(proxy.proc.pid) is None:
            results.note("RSS and CPU skipped: no /proc on this system")
        asyncio.run(measure_run(results, endpoints, setup.duration))
        if proxy.proc.poll() is not None:
            raise BenchError(f"proxypal.py exited with code {proxy.proc.returncode} "
                             "during the run")
        if len(proxies) > 1 and proxies[1].proc.poll() is not None:
            results.record_errors("run", "baseline",
                                  [f"exited with code {proxies[1].proc.returncode}"])
    finally:
        for p in proxies:
            stop_child(p.proc)
    for count in WORKER_COUNTS:
        measure_workers(results, setup, endpoints, count, run)


def measure_workers(results: Results, setup: Setup, endpoints: Dict[str, Endpoint],
                    count: int, run: int) -> None:
    """Non-stream requests/s at JUDGED_CONCURRENCY with the proxy started as --workers N."""
    progress(f"  --workers {count}")
    key, phase_name = workers_key(count), f"--workers {count}"
    try:
        proxy = start_proxy(setup.proxy_file, setup.config_path,
                            log_path(setup, f"workers{count}-{run}"), workers=count)
    except BenchError as exc:
        results.failed.add(key)
        results.record_errors(phase_name, "proxy", [str(exc)])
        return
    try:
        phase = asyncio.run(measure(results, dict(endpoints, proxy=Endpoint(proxy.port, None)),
                                    "proxy", CHAT, JUDGED_CONCURRENCY, setup.duration,
                                    phase_name, (key,)))
        if phase is not None:
            results.add(key, "proxy", len(phase.samples) / phase.elapsed)
    finally:
        stop_child(proxy.proc)


def log_path(setup: Setup, name: str) -> str:
    return os.path.join(setup.tmp, f"{name}.log")


async def check_shapes(results: Results, endpoints: Dict[str, Endpoint]) -> None:
    """One non-stream and one streamed answer of every pair, read whole and checked
    (direct too where the APIs match: a check of the mock itself)."""
    for pair in PAIRS:
        paths = ("proxy",) if pair.translated else ("direct", "proxy")
        for path in paths + (("baseline",) if "baseline" in endpoints else ()):
            for stream in (False, True):
                problem = await shape_problem(endpoints[path].port, pair, stream)
                if problem:
                    kind = "stream" if stream else "non-stream"
                    results.record_errors(f"shape check, {pair.label} {kind}", path, [problem])


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


# =============================================================================
# Report
# =============================================================================

def number(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(runs: List[float]) -> str:
    if not runs:
        return "-"
    return "/".join(number(v) for v in (min(runs), statistics.median(runs), max(runs)))


def quotient(mine: Optional[float], other: Optional[float]) -> str:
    return "-" if mine is None or not other else f"{mine / other:.2f}x"


def table_sections() -> List[Tuple[str, List[str]]]:
    """The table: section titles, and the row keys under each, in order."""
    def rows(*stream_rows: StreamRow) -> List[str]:
        return [key for row in stream_rows for key in (row.rate_key, row.cpu_key)]

    burst, paced, translated = STREAM_ROWS[0:2], STREAM_ROWS[2:4], STREAM_ROWS[4:6]
    return [
        (f"pass-through stream, burst: the mock writes a whole {UPSTREAM_EVENTS}-event stream "
         f"at once; {STREAM_CONCURRENCY} streams at a time", rows(*burst)),
        (f"pass-through stream, paced: one event every {PACE_MS} ms, one per read; "
         f"{STREAM_CONCURRENCY} streams at a time", rows(*paced)),
        ("translated stream, burst; direct and relay: the upstream's own stream, untranslated",
         rows(*translated)),
        ("non-stream, openai -> openai",
         [non_stream_key(c, m) for c in CONCURRENCIES
          for m in ("requests/s", "p50 ms", "p99 ms", "CPU us/request")]),
        (f"time to first event, openai -> openai; sent alone: the mock pauses {PACE_MS} ms "
         "after it; added: minus direct",
         [first_event_key(mode, metric) for mode in FIRST_EVENT_CALLS
          for metric in ("p50 ms", "added ms")]),
        ("memory and start", [IDLE_RSS, HELD_RSS, COLD_START]),
        (f"--workers N: N processes on one port (SO_REUSEPORT), beside the single process; "
         f"{os.cpu_count()} CPUs for all",
         [SINGLE_PROCESS] + [workers_key(n) for n in WORKER_COUNTS]),
    ]


def borrowed(key: str) -> str:
    """Where a row's direct and relay cells come from: a translated stream row shows the
    untranslated stream of its upstream's format; other rows their own."""
    for row in STREAM_ROWS:
        if row.pair.translated and key in (row.rate_key, row.cpu_key):
            return row.untranslated.rate_key if key == row.rate_key else row.untranslated.cpu_key
    return key


def print_table(results: Results, runs: int) -> None:
    print(f"\neach cell: min/median/max over {runs} run(s); ratios compare medians. CPU: of the "
          "relay or proxy process alone.\n")
    row = "{:<48} {:>20} {:>20} {:>20} {:>8} {:>8}"
    print(row.format("", "direct", "relay", "proxy", "p/direct", "p/relay"))
    print("-" * 129)
    for title, keys in table_sections():
        print(title)
        for key in keys:
            other = borrowed(key)
            proxy = results.median(key, "proxy")
            print(row.format(
                "  " + key, cell(results.runs(other, "direct")), cell(results.runs(other, "relay")),
                cell(results.runs(key, "proxy")), quotient(proxy, results.median(other, "direct")),
                quotient(proxy, results.median(other, "relay"))))


def print_baseline(results: Results, label: str, runs: int) -> None:
    print(f"\ncurrent proxy vs baseline {label}, same mock, same runs (min/median/max over "
          f"{runs}); ratio: current / baseline, medians\n")
    row = "{:<30} {:>20} {:>20} {:>7}   {:>17} {:>17} {:>7}"
    print(row.format("stream", "events/s current", "baseline", "ratio",
                     "CPU us/ev current", "baseline", "ratio"))
    print("-" * 128)
    for stream in STREAM_ROWS:
        cells: List[str] = []
        for key in (stream.rate_key, stream.cpu_key):
            cells += [cell(results.runs(key, "proxy")), cell(results.runs(key, "baseline")),
                      quotient(results.median(key, "proxy"), results.median(key, "baseline"))]
        print(row.format(stream.name, *cells))
    print("(translated rows: upstream events; CPU per upstream event)")


class Verdict(NamedTuple):
    result: str                        # PASS, FAIL, SKIP, or info
    key: str
    value: Optional[float]
    target: str


def judge(results: Results, key: str, limit: Optional[float], target: str) -> Verdict:
    value = results.median(key, "proxy")
    if key in results.failed:
        return Verdict("FAIL", key, value, target + "  (the proxy failed requests, see below)")
    if value is None or limit is None:
        return Verdict("SKIP", key, value, target + "  (not measured here)")
    return Verdict("PASS" if value <= limit else "FAIL", key, value, target)


def verdicts(results: Results) -> List[Verdict]:
    out = [judge(results, row.cpu_key, BURST_CPU_US, f"<= {BURST_CPU_US:g}")
           for row in STREAM_ROWS[0:2]]
    for row in STREAM_ROWS[2:4]:
        relay = results.median(row.cpu_key, "relay")
        limit = None if relay is None else PACED_VS_RELAY * relay
        out.append(judge(results, row.cpu_key, limit,
                         f"<= {PACED_VS_RELAY:g} x relay {number(relay)} = {number(limit)}"))
    out += [judge(results, STREAM_ROWS[4].cpu_key, TRANSLATED_CPU_US, f"<= {TRANSLATED_CPU_US:g}"),
            judge(results, non_stream_key(JUDGED_CONCURRENCY, "CPU us/request"), REQUEST_CPU_US,
                  f"<= {REQUEST_CPU_US:g}"),
            judge(results, ADDED_FIRST_EVENT, ADDED_FIRST_EVENT_MS,
                  f"<= +{ADDED_FIRST_EVENT_MS:g}"),
            judge(results, IDLE_RSS, IDLE_RSS_MB, f"<= {IDLE_RSS_MB:g}"),
            judge(results, HELD_RSS, HELD_RSS_MB, f"<= {HELD_RSS_MB:g}")]
    reported = [STREAM_ROWS[5].cpu_key, first_event_key("burst", "added ms"), COLD_START,
                SINGLE_PROCESS] + [
        workers_key(n) for n in WORKER_COUNTS]
    out += [Verdict("info", key, results.median(key, "proxy"), "reported") for key in reported]
    return out


def print_verdicts(results: Results, runs: int) -> int:
    """One line per target; returns how many were missed."""
    print(f"\ntargets (the proxy's medians over {runs} run(s))\n")
    missed = 0
    for v in verdicts(results):
        missed += v.result == "FAIL"
        print(f"  {v.result:<5} {v.key:<48} {number(v.value):>8}   {v.target}")
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
                    "to a mock upstream (see the module docstring for the rows and targets).")
    parser.add_argument("--runs", type=int, default=3, help="measurement runs (default 3)")
    parser.add_argument("--duration", type=float, default=None,
                        help=f"seconds per load point (default {DURATION:g}; "
                             f"{QUICK_DURATION:g} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="one short run: a smoke test of the bench itself")
    parser.add_argument("--proxy", metavar="PATH",
                        default=os.environ.get(PROXY_ENV) or os.path.join(REPO, "proxypal.py"),
                        help=f"the proxypal.py to measure (default ${PROXY_ENV}, else the "
                             "repository's)")
    parser.add_argument("--baseline", metavar="REV",
                        help="also measure the stream rows on this proxypal.py: a git revision "
                             "of this repository (HEAD~1) or a file path")
    parser.add_argument("--serve", choices=("mock", "relay"), help=argparse.SUPPRESS)
    parser.add_argument("--upstream-port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.runs = 1
    if args.duration is None:
        args.duration = QUICK_DURATION if args.quick else DURATION
    if args.runs < 1 or args.duration <= 0:
        parser.error("--runs must be at least 1 and --duration positive")
    if not args.serve and not os.path.isfile(args.proxy):
        parser.error(f"no proxy file at {args.proxy}")
    return args


def interrupt_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM is handled as Ctrl-C: the run unwinds and the finally blocks stop every child."""
    os.kill(os.getpid(), signal.SIGINT)


def load_average() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "load average unknown"


class Busy(NamedTuple):
    """CPU seconds so far: every process on the machine, this bench with its reaped
    children, and time the hypervisor gave to other guests (steal)."""
    machine: float
    ours: float
    stolen: float


def busy_seconds() -> Optional[Busy]:
    """None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, steal = fields[0], fields[1], fields[2], fields[7]
    return Busy((user + nice + system) * TICK, sum(os.times()[:4]), steal * TICK)


def others_text(before: Optional[Busy], seconds: float) -> str:
    """What else ran while the bench did (the noise in its figures); called once every
    child has been reaped, so that their CPU counts as the bench's own."""
    after = busy_seconds()
    if before is None or after is None or seconds <= 0:
        return ""
    others = (after.machine - before.machine) - (after.ours - before.ours)
    return (f"; meanwhile other processes used {max(0.0, others) / seconds * 100:.0f}% of a "
            f"CPU and the hypervisor stole {(after.stolen - before.stolen) / seconds * 100:.0f}%")


def bench(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)
    raise_fd_limit(4 * HELD_STREAMS + 256)
    results = Results()
    children: List[subprocess.Popen] = []
    load_before, busy_before, wall_before = load_average(), busy_seconds(), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="proxypal-bench-") as tmp:
        base_file, base_label = (baseline_file(args.baseline, tmp) if args.baseline
                                 else (None, ""))
        try:
            mock, mock_port = start_server_child("mock")
            children.append(mock)
            relay, relay_port = start_server_child("relay", mock_port)
            children.append(relay)
            setup = Setup(tmp, write_proxy_config(tmp, mock_port), os.path.abspath(args.proxy),
                          base_file, args.duration)
            endpoints = {"direct": Endpoint(mock_port, None),
                         "relay": Endpoint(relay_port, relay.pid)}
            started = time.monotonic()
            for run in range(1, args.runs + 1):
                progress(f"run {run}/{args.runs}")
                one_run(results, setup, endpoints, run)
            elapsed = time.monotonic() - started
        finally:
            for child in reversed(children):
                stop_child(child)
        print(f"proxypal bench: {setup.proxy_file}"
              + (f"; baseline {base_label}: {base_file}" if base_file else ""))
        print(f"{args.runs} run(s) in {elapsed:.0f}s, {args.duration:g}s per load point, "
              f"{UPSTREAM_EVENTS}-event streams; Python {sys.version.split()[0]}, "
              f"{os.cpu_count()} CPU(s) shared by the load client, mock, relay and proxy; "
              f"{load_before} before, {load_average()} after"
              f"{others_text(busy_before, time.monotonic() - wall_before)}")
        print_table(results, args.runs)
        if base_file:
            print_baseline(results, base_label, args.runs)
        missed = print_verdicts(results, args.runs)
        logs = sorted(os.path.join(tmp, name) for name in os.listdir(tmp) if name.endswith(".log"))
        print_errors(results, logs)
    print(f"\n{missed} target(s) missed" if missed else "\nall targets met")
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
