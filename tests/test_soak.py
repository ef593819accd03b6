"""A mixed load on `python proxypal.py` as a user runs it: 2,000 sequential and 500
concurrent requests (streams, whole answers, errors, clients that leave mid-stream).
Afterwards the process holds no more file descriptors than when it was idle, its memory
is back near its level after warm-up, and every request is in the request log once."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from typing import List, Tuple

import pytest

from helpers import OPENAI_STREAM, TIMEOUT, MockUpstream, json_answer, openai_completion, proxypal, send

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "proxypal.py")
KEY = b"Bearer proxypal-local"

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux)")


UPSTREAM_CLOSED = []                       # streams the proxy closed when their client left


def respond(handler, rec):
    model = rec.json().get("model")
    if model == "slow":                    # one event, then silence until the proxy hangs up
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(OPENAI_STREAM[0]), OPENAI_STREAM[0]))
        handler.wfile.flush()
        handler.connection.settimeout(TIMEOUT)
        try:
            if handler.connection.recv(1) == b"":
                UPSTREAM_CLOSED.append(rec)
        except OSError:
            UPSTREAM_CLOSED.append(rec)
        handler.close_connection = True
        return
    if model == "bad":
        send(handler, 500, b'{"error":{"message":"upstream broke"}}')
        return
    if rec.json().get("stream"):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Content-Length", str(sum(len(e) for e in OPENAI_STREAM)))
        handler.end_headers()
        for event in OPENAI_STREAM:
            handler.wfile.write(event)
            handler.wfile.flush()
        return
    json_answer(200, openai_completion(model))(handler, rec)


KINDS = ["plain", "stream", "unknown", "upstream-error", "left-mid-stream"]


def request_bytes(kind: str) -> bytes:
    model = {"unknown": "nope", "upstream-error": "bad", "left-mid-stream": "slow"}.get(kind, "m")
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if kind in ("stream", "left-mid-stream"):
        body["stream"] = True
    data = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: " + KEY +
            b"\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(data)
            + data)


async def one(port: int, kind: str) -> int:
    """One request on its own connection; the status line's code (0 for one left early)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_bytes(kind))
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    status = int(head.split(b" ", 2)[1])
    if kind == "left-mid-stream":
        await asyncio.wait_for(reader.read(100), TIMEOUT)
        writer.transport.abort()                          # gone without reading the rest
        return 0
    await asyncio.wait_for(reader.read(), TIMEOUT)        # to the end (Connection: close)
    writer.close()
    return status


async def sequential(port: int, count: int) -> List[int]:
    return [await one(port, KINDS[i % len(KINDS)]) for i in range(count)]


async def concurrent(port: int, count: int) -> List[int]:
    return list(await asyncio.gather(*(one(port, KINDS[i % len(KINDS)]) for i in range(count))))


def fds(pid: int, upstream_port: int) -> Tuple[int, int]:
    """(descriptors other than connections to the upstream, connections to the upstream):
    the second are the pool's, which keeps up to POOL_IDLE_PER_HOST."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            inodes.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    pooled = 0
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for row in f.read().splitlines()[1:]:
                cols = row.split()
                if int(cols[2].rsplit(":", 1)[1], 16) == upstream_port and \
                        f"socket:[{cols[9]}]" in inodes:
                    pooled += 1
    return len(inodes) - pooled, pooled


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def test_mixed_load_leaves_nothing_behind(tmp_path):
    up = MockUpstream(respond)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"managementKey": "mk-soak-test", "ampOpenaiProviders": [
        {"name": "Mock", "baseUrl": up.url + "/v1", "apiKey": "k", "models": ["m", "bad", "slow"]}]}))
    log_path = tmp_path / "proxy.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, SCRIPT, "--config", str(config), "--port", "0",
                                 "--log-requests"], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        port = int(re.search(r":(\d+)\s*$", proc.stdout.readline()).group(1))
        threading.Thread(target=proc.stdout.read, daemon=True).start()   # drain the banner
        # warm-up: imports, caches, some of the upstream pool
        sent = asyncio.run(sequential(port, 100)) + asyncio.run(concurrent(port, 100))
        (idle_fds, _), idle_rss = fds(proc.pid, up.port), rss_mb(proc.pid)
        statuses = asyncio.run(sequential(port, 2000)) + asyncio.run(concurrent(port, 500))
        sent += statuses
        expected = {"plain": 200, "stream": 200, "unknown": 404, "upstream-error": 500, "left-mid-stream": 0}
        assert statuses == [expected[KINDS[i % len(KINDS)]] for i in range(2000)] + \
            [expected[KINDS[i % len(KINDS)]] for i in range(500)]
        deadline = time.monotonic() + TIMEOUT
        while fds(proc.pid, up.port)[0] > idle_fds and time.monotonic() < deadline:
            time.sleep(0.05)                               # closing sockets takes a moment
        other, pooled = fds(proc.pid, up.port)
        assert other <= idle_fds, f"{other} descriptors open besides the pool, {idle_fds} when idle"
        assert pooled <= proxypal.POOL_IDLE_PER_HOST
        assert rss_mb(proc.pid) < idle_rss + 12, f"RSS {rss_mb(proc.pid):.1f} MB, {idle_rss:.1f} MB idle"
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            entries = [json.loads(line[line.index("{"):]) for line in log_path.read_text().splitlines()
                       if '"status":' in line]
            if len(entries) >= len(sent):
                break
            time.sleep(0.05)
        ids = [e["id"] for e in entries]
        assert len(ids) == len(sent) == 2700 and len(set(ids)) == len(ids)
        assert sum(1 for e in entries if e["error"] == "client disconnected") == 540
        deadline = time.monotonic() + TIMEOUT
        while len(UPSTREAM_CLOSED) < 540 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(UPSTREAM_CLOSED) == 540        # each left client's upstream stream ended too
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)
        up.close()
