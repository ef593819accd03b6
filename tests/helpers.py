"""Shared test helpers: mock upstreams that speak real HTTP, a proxy running on its own
loop thread, raw-socket clients, and feed_all_ways() for incremental decoders."""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import queue
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import proxypal  # noqa: E402

TIMEOUT = 10  # every socket in the tests gives up after this; nothing waits longer


# -- incremental decoders ---------------------------------------------------------

def splits(data: bytes) -> Iterator[List[bytes]]:
    """data whole, one byte at a time, and cut in two at every position."""
    yield [data]
    yield [data[i:i + 1] for i in range(len(data))]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]


def feed_all_ways(make: Callable[[], Any], data: bytes, finish: Callable[[Any], list] = None,
                  normalize: Callable[[list], Any] = list):
    """Feed a fresh decoder `data` every way splits() cuts it; assert all ways agree and
    return the (single) result: normalize(the feed() outputs plus finish(decoder))."""
    results = []
    for pieces in splits(data):
        decoder = make()
        out: list = []
        for piece in pieces:
            out += decoder.feed(piece)
        if finish:
            out += finish(decoder)
        results.append(normalize(out))
    first = results[0]
    for other in results[1:]:
        assert other == first
    return first


# -- mock upstream ----------------------------------------------------------------

class Recorded:
    def __init__(self, method: str, path: str, headers: Dict[str, str], body: bytes):
        self.method, self.path, self.headers, self.body = method, path, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


class MockUpstream:
    """A real HTTP/1.1 server on 127.0.0.1:0 that records each request and answers with
    whatever the test's `respond(handler, recorded)` does. Default: a JSON echo."""

    def __init__(self, respond: Optional[Callable[[BaseHTTPRequestHandler, Recorded], None]] = None):
        self.requests: "queue.Queue[Recorded]" = queue.Queue()
        self.all: List[Recorded] = []
        self.respond = respond or json_answer(200, {"ok": True})
        self.connections = 0
        mock = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # head and body go in two writes: without this, Nagle holds the body back
                # until the proxy's delayed ACK (40 ms a request on Linux)
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                mock.connections += 1

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                rec = Recorded(self.command, self.path,
                               {k.lower(): v for k, v in self.headers.items()}, body)
                mock.all.append(rec)
                mock.requests.put(rec)
                mock.respond(self, rec)

            do_POST = do_GET = do_CONNECT = _handle

        ThreadingHTTPServer.request_queue_size = 1024     # room for hundreds of connections
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def last(self) -> Recorded:
        return self.requests.get(timeout=TIMEOUT)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes,
         content_type: str = "application/json", headers: Tuple[Tuple[str, str], ...] = ()) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for k, v in headers:
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)


def json_answer(status: int, obj: Any, headers: Tuple[Tuple[str, str], ...] = ()):
    def respond(handler: BaseHTTPRequestHandler, rec: Recorded) -> None:
        send(handler, status, json.dumps(obj).encode(), headers=headers)
    return respond


def sse_answer(events: List[bytes], framing: str = "chunked",
               gate: Optional[Callable[[int], None]] = None):
    """Answer with text/event-stream; framing: chunked, length or close."""
    def respond(handler: BaseHTTPRequestHandler, rec: Recorded) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        if framing == "chunked":
            handler.send_header("Transfer-Encoding", "chunked")
        elif framing == "length":
            handler.send_header("Content-Length", str(sum(len(e) for e in events)))
        else:
            handler.send_header("Connection", "close")
            handler.close_connection = True
        handler.end_headers()
        for i, event in enumerate(events):
            if gate:
                gate(i)
            if framing == "chunked":
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            else:
                handler.wfile.write(event)
            handler.wfile.flush()
        if framing == "chunked":
            handler.wfile.write(b"0\r\n\r\n")
    return respond


def openai_completion(model: str = "gpt-x", text: str = "Hello") -> Dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


def mock_provider(url: str, **extra: Any) -> Dict[str, Any]:
    """An ampOpenaiProviders entry for a mock upstream serving model "m"."""
    return dict({"name": "Mock", "baseUrl": url + "/v1", "apiKey": "k", "models": ["m"]}, **extra)


def anthropic_message(model: str = "claude-x", text: str = "Hello") -> Dict[str, Any]:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1}}


ANTHROPIC_STREAM = [
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-x","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":3,"output_tokens":1}}}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"lo"}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":2}}\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
]


def anthropic_stream_named(model: str) -> List[bytes]:
    """ANTHROPIC_STREAM as a relay gives it to a client that asked for `model`: its
    message_start names that model (Claude Code keeps thinking only from its own model)."""
    return [ANTHROPIC_STREAM[0].replace(b'"model":"claude-x"', b'"model":"%s"' % model.encode())] + \
        ANTHROPIC_STREAM[1:]

OPENAI_STREAM = [
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-x","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n',
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-x","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}\n\n',
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-x","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}\n\n',
    b"data: [DONE]\n\n",
]


# -- proxy under test -------------------------------------------------------------

class RunningProxy:
    """proxypal.start() on its own event loop thread, so tests can use blocking clients."""

    def __init__(self, config: Any, **kwargs: Any):
        self.loop = asyncio.new_event_loop()
        ready: "queue.Queue[Any]" = queue.Queue()

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            async def boot() -> None:
                try:
                    ready.put(await proxypal.start(config, port=0, **kwargs))
                except BaseException as exc:  # surfaced in the test thread
                    ready.put(exc)
            self.loop.run_until_complete(boot())
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        got = ready.get(timeout=TIMEOUT)
        if isinstance(got, BaseException):
            raise got
        self.server: proxypal.Server = got
        self.port = got.port
        self.url = f"http://127.0.0.1:{self.port}"

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    def close(self) -> None:
        async def stop() -> None:
            await self.server.close(grace=1.0)
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


def request(proxy: RunningProxy, method: str, path: str, body: Any = None,
            headers: Optional[Dict[str, str]] = None, key: Optional[str] = "proxypal-local"
            ) -> Tuple[int, Dict[str, str], bytes]:
    """One request through http.client; returns (status, lower-case headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=TIMEOUT)
    hdrs = {"Content-Type": "application/json"}
    if key:
        hdrs["Authorization"] = f"Bearer {key}"
    hdrs.update(headers or {})
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


def request_stream(proxy: RunningProxy, method: str, path: str, body: Any = None,
                   headers: Optional[Dict[str, str]] = None, key: Optional[str] = "proxypal-local"
                   ) -> Tuple[int, Dict[str, str], bytes, bool]:
    """Like request(), for a streamed answer that may end without its chunked body's last
    chunk (how a failed Gemini stream ends): (status, headers, body, complete)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=TIMEOUT)
    hdrs = {"Content-Type": "application/json"}
    if key:
        hdrs["Authorization"] = f"Bearer {key}"
    hdrs.update(headers or {})
    conn.request(method, path, body=json.dumps(body).encode(), headers=hdrs)
    resp = conn.getresponse()
    parts, complete = [], True
    while True:
        try:
            piece = resp.read1(65536)
        except http.client.IncompleteRead as exc:
            parts.append(exc.partial)
            complete = False
            break
        if not piece:
            break
        parts.append(piece)
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, b"".join(parts), complete


def raw_exchange(port: int, data: bytes, read_until_close: bool = True) -> bytes:
    """Send raw bytes, return everything the proxy answers until it closes (or times out)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                more = sock.recv(65536)
            except socket.timeout:
                break
            if not more:
                break
            chunks.append(more)
            if not read_until_close:
                break
        return b"".join(chunks)


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def body_of(raw: bytes) -> Any:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


def without_cache_marks(value: Any) -> Any:
    """A request body without the cache_control marks the proxy adds toward Anthropic
    (tested on their own): for the tables whose subject is every other field."""
    if isinstance(value, dict):
        return {k: without_cache_marks(v) for k, v in value.items()
                if not (k == "cache_control" and v == {"type": "ephemeral"})}
    if isinstance(value, list):
        return [without_cache_marks(v) for v in value]
    return value
